from SpineNetLib.apps.cli import command_line

command_line()
