"""The one entry script of the PyInstaller bundle: bin/anywhered, bin/anywhere and bin/anywherectl
are three executables sharing one runtime (bin/_internal); each runs the command it is named after."""

import os
import sys


def main() -> int:
    name = os.path.basename(sys.executable)
    if name == "anywhered":
        from anywhere.server_cli import main as run
    elif name == "anywhere":
        from anywhere.agent_cli import main as run
    elif name == "anywherectl":
        from anywhere.ctl import main as run
    else:
        print(f"{name}: run this program as anywhered, anywhere or anywherectl", file=sys.stderr)
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
