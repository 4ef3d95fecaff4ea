"""``python -m exl2.convert`` is ``exl2-convert``."""
from exl2.convert.cli import convert_main

convert_main()
