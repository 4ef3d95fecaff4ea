"""exl2.measure"""
