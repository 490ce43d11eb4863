from lipverify.cli import main

main()
