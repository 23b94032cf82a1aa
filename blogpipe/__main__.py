from blogpipe.cli import main

raise SystemExit(main())
