from didbq.cli import main

main()
