"""exl2.calibration"""
