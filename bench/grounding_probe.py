"""How many steps does the network need before its location tokens depend on the image?

A learning-dynamics probe, not a speed benchmark. It trains a freshly initialised network on a
synthetic localisation task that is far easier than the toy world's, and logs, every
``--log-every`` steps, on the batch just trained on:

- ``loss``: the teacher-forced loss of the 4 location tokens of the target box (nats per token);
- ``image use``: the loss with the images rolled by one within the batch, minus ``loss``
  (about 0: the outputs ignore the image);
- ``|bin err|``: the mean absolute error of the argmax location bins (of 1000; 7.8 bins = 1 px).

Scenes: 128-px images of a grey background with ``--objects`` squares (16-39 px, 6 colours, no two
alike). The prompt names the colour of one square (a prompt token per colour); the target is that
square's box. With ``--objects 1`` the colour is redundant: the task is "where is the square?".
With more, the network must also bind the colour word to the patches of that colour.

    python bench/grounding_probe.py --objects 1 --steps 400 --lr 1e-3       # N(0,1) position tables
    python bench/grounding_probe.py --objects 1 --steps 400 --lr 1e-3 --sincos-init --cross-position-bias
    python bench/grounding_probe.py --objects 3 --steps 1000 --sincos-init --cross-position-bias  # lr 3e-4
    python bench/grounding_probe.py --objects 3 --steps 1000 --sincos-init --cross-position-bias --lr 1e-3
    python bench/grounding_probe.py --objects 3 --steps 1000 --sincos-init --cross-position-bias --optimizer adafactor --lr 1e-2

Measured results are in docs/results-toyworld-v1.md ("Where grounding stalls").
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from uio.config import ModelConfig
from uio.modeling.network import UnifiedIONetwork
from uio.training.optim import build_optimizer

PALETTE = torch.tensor([[1.0, -1, -1], [-1, 1.0, -1], [-1, -1, 1.0], [1.0, 1.0, -1], [1.0, -1, 1.0], [-1, 1.0, 1.0]])
SIZE = 128
PROMPT = (5, 6)  # two fixed prompt tokens, then the colour token, then EOS
COLOUR_TOKEN = 10  # colour c is prompt token 10 + c


def make_batch(batch: int, objects: int, g: torch.Generator, vocab) -> tuple[torch.Tensor, ...]:
    """(text (B, 4), normalised images (B, 3, 128, 128), target location ids (B, 4) y1 x1 y2 x2)."""
    images = torch.full((batch, 3, SIZE, SIZE), -0.5)
    text, boxes = [], []
    for b in range(batch):
        colours = torch.randperm(len(PALETTE), generator=g)[:objects].tolist()
        for c in colours:  # the last square is drawn on top and is the one asked for
            s = int(torch.randint(16, 40, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, SIZE - s, (2,), generator=g))
            images[b, :, y : y + s, x : x + s] = PALETTE[c][:, None, None]
        boxes.append([y, x, y + s, x + s])
        text.append([*PROMPT, COLOUR_TOKEN + colours[-1], vocab.eos_id])
    bins = vocab.quantize(torch.tensor(boxes, dtype=torch.float64).numpy(), SIZE)
    return torch.tensor(text), images, torch.as_tensor(vocab.loc_id(bins))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=1, help="squares per image (1..6)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw",
                    help="adamw (torch) or the paper's Adafactor (uio.training.optim: momentum 0.9, "
                         "decay 0.8, parameter-scaled steps); constant lr, no warmup, global-norm clip 1.0")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--size", default="tiny", help="model size (uio.config.SIZES)")
    ap.add_argument("--sincos-init", action="store_true", help="ModelConfig.sincos_init")
    ap.add_argument("--cross-position-bias", action="store_true", help="ModelConfig.cross_position_bias")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the log rows here")
    a = ap.parse_args(argv)
    if not 1 <= a.objects <= len(PALETTE):
        ap.error(f"--objects must be in 1..{len(PALETTE)}")
    torch.manual_seed(a.seed)
    cfg = ModelConfig.from_size(a.size, text_vocab=1000, image_vocab=64, image_input_size=(SIZE, SIZE),
                                encoder_max_text_len=16, decoder_max_text_len=8, image_target_grid=(4, 4),
                                image_target_size=(64, 64), sincos_init=a.sincos_init,
                                cross_position_bias=a.cross_position_bias)
    net = UnifiedIONetwork(cfg)
    net.init_weights()
    vocab = cfg.vocab
    opt = build_optimizer(net, a.optimizer, lr=a.lr)  # uio-train's, without weight decay
    g = torch.Generator().manual_seed(a.seed)
    valid = torch.ones(a.batch, 4, dtype=torch.bool)

    def loss_of(text, images, target):
        dec_in = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], 1)
        with torch.autocast("cpu", torch.bfloat16):
            logits = net.logits(net.decode(net.encode(text, images), dec_in, 4, valid), "text")
        return F.cross_entropy(logits.flatten(0, 1), target.flatten()), logits

    rows, t0 = [], time.time()
    print(f"{'step':>6} {'loss':>7} {'image use':>9} {'|bin err|':>9} {'s':>5}")
    for step in range(a.steps):
        text, images, target = make_batch(a.batch, a.objects, g, vocab)
        loss, logits = loss_of(text, images, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % a.log_every == 0 or step == a.steps - 1:
            with torch.no_grad():
                rolled, _ = loss_of(text, images.roll(1, 0), target)
                err = (vocab.loc_bin(logits.argmax(-1)) - vocab.loc_bin(target)).abs().float().mean()
            row = dict(step=step, loss=loss.item(), image_use=rolled.item() - loss.item(), bin_err=err.item(),
                       seconds=time.time() - t0)
            rows.append(row)
            print(f"{step:6d} {row['loss']:7.3f} {row['image_use']:9.3f} {row['bin_err']:9.1f} {row['seconds']:5.0f}",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
