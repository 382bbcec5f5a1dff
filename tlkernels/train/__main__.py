from tlkernels.train.loop import main

main()
