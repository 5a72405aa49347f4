import sys

from ftpipe.core.training.program import main

sys.exit(main())
