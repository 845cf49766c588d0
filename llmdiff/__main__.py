from llmdiff.cli import main

main()
