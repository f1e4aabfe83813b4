from lora_convert.cli import main

main()
