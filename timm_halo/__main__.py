import sys

from timm_halo.cli import main

sys.exit(main())
