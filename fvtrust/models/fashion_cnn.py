"""The embedded default: a small Conv-BN-ReLU network for Fashion-MNIST.

Conv-BN-ReLU blocks (named ``conv``, ``bn``, ``relu``) are what both fooling
methods of the paper need: silent units rewrite a block's conv, the fooling
circuit rewires the last layer (``fc``, the logits).
"""
from torch import nn

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)


class ConvBNReLU(nn.Module):
    """y = ReLU(BN(Conv(x))): the block the silent-units construction targets."""

    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class FashionCNN(nn.Module):
    """28x28x1 -> 10 logits. Layers: block1..block4, pool1, pool2, gap, fc."""

    def __init__(self, widths=(32, 64, 64, 128), num_classes=10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.block1 = ConvBNReLU(1, w1)
        self.pool1 = nn.MaxPool2d(2)            # 28 -> 14
        self.block2 = ConvBNReLU(w1, w2)
        self.block3 = ConvBNReLU(w2, w3)
        self.pool2 = nn.MaxPool2d(2)            # 14 -> 7
        self.block4 = ConvBNReLU(w3, w4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x):
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block3(self.block2(x)))
        x = self.gap(self.block4(x))
        return self.fc(self.dropout(self.flatten(x)))
