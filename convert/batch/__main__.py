"""`python -m exl2.convert.batch`: the same command as `exl2-batch`.

Ray workers find run_task under its module name (exl2.convert.batch.worker), whichever way the driver
was started, so Ray pickles it by reference.
"""
from exl2.convert.batch.cli import main

main()
