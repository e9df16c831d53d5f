from cls2det.cli import main

raise SystemExit(main())
