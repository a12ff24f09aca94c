import sys

from lookahead_ray.cli import main

sys.exit(main())
