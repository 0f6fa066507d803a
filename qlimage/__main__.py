from qlimage.cli import main

main()
