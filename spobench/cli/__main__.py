from spobench.cli.app import main

main()
