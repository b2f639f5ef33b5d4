from vieval_runner.cli import main

raise SystemExit(main())
