"""exl2.runtime"""
