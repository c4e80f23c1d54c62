from kvpipe.cli.app import main

main()
