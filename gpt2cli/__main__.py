from gpt2cli.cli import main

main()
