import os
import sys

from .worker import main

code = main()
# Everything the worker owns is closed by now; skip tearing down torch's interpreter state (~0.5 s a
# process), which would only delay the coordinator's close().
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
