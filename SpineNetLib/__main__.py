from SpineNetLib.apps.cli import command

command()
