import sys

from fastpref.train import main

sys.exit(main())
