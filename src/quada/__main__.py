from quada.cli import main

main()
