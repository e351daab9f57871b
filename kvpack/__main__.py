from kvpack.cli import main

raise SystemExit(main())
