from unitrain.cli import main

raise SystemExit(main())
