import sys

from SpineNetLib.apps.cli import program

sys.exit(program())
