from .server_cli import main

raise SystemExit(main())
