from facemark.cli import main

main()
