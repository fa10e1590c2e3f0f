"""CIFAR-10 ResNet-20/56 (He et al. 2016, option-A zero-padding shortcuts), the architecture of the real
checkpoints in ../shared/realdata/cifar10-resnets (used only by tests/test_realdata.py, a ``py:`` model)."""
import torch, torch.nn as nn, torch.nn.functional as F
class LambdaLayer(nn.Module):
    def __init__(self, fn): super().__init__(); self.fn = fn
    def forward(self, x): return self.fn(x)
class BasicBlock(nn.Module):
    def __init__(self, inp, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False); self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False); self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)))
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x))); out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))
class ResNet(nn.Module):
    def __init__(self, n):
        super().__init__(); self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False); self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make(16, n, 1); self.layer2 = self._make(32, n, 2); self.layer3 = self._make(64, n, 2)
        self.linear = nn.Linear(64, 10)
    def _make(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s)); self.in_planes = planes
        return nn.Sequential(*layers)
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
def resnet20(): return ResNet(3)
def resnet56(): return ResNet(9)
