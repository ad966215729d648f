"""Train your own memory model with MRBP in torch: two stacked memories recall a token."""
import os

import torch

from memcore.backends.torch import MemoryReader, MemoryWriter
from memcore.backends.torch.mrbp_model import mrbp

V, D, K, H, T, L, B = 8, 16, 4, 2, 6, 4, 32  # vocab, width, slots, heads, segments, tokens, batch

class TwoMemoryLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(V, D), torch.nn.Linear(D, V, bias=False)
        self.read = torch.nn.ModuleList([MemoryReader(D, H), MemoryReader(D, H)])
        self.write = torch.nn.ModuleList([MemoryWriter(K, D, H), MemoryWriter(K, D, H)])

    def initial_memory(self, batch=B):  # M_0 from each writer's v_bias: (B, K, D) twice
        return [w.init_memory(batch) for w in self.write]

    def forward(self, memory, seg):  # step(memory, segment) -> (loss, next memory)
        h, new = self.embed(seg["tokens"]), []
        for read, write, m in zip(self.read, self.write, memory):  # two stacked memory layers
            h = h + read(h, m)  # read memory i, then write it from h
            new.append(write(m, h))
        return torch.nn.functional.cross_entropy(self.head(h).mT, seg["targets"]), new


if __name__ == "__main__":
    net = TwoMemoryLM()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(int(os.environ.get("STEPS", "200"))):
        x = torch.randint(0, V, (T, B, L))  # T segments of L tokens; segment 0: one key, repeated
        x[0] = x[0, :, :1]  # every token of every segment must predict the key (recall)
        out = mrbp(net, net.initial_memory(), {"tokens": x, "targets": x[:1, :, :1].expand_as(x)})
        opt.step()  # mrbp left dL/dparam in every .grad, as loss.backward() would
        opt.zero_grad()
        if i % 20 == 0:
            print(f"step {i:4d}  loss per segment {out.loss / T:.3f}")
