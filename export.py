"""Write a compressed model as TorchScript and ONNX, checked against PyTorch. See README.md."""
from gsparsity.export import main

if __name__ == "__main__":
    main()
