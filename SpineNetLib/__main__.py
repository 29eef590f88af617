import sys

from SpineNetLib.apps.cli import main

sys.exit(main())
