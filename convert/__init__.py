"""exl2.convert"""
