"""The tiny trained run the command tests work on."""

from torchglow import preset


def tiny_run(tmp_path_factory) -> str:
    """A 10-step run of a 2-step digits model on the CPU, its grids at temperatures 0 and 1."""
    from torchglow.config import TrainConfig
    from torchglow.train.loop import train

    out = tmp_path_factory.mktemp("run")
    train(preset("digits", n_steps=2, hidden_channels=16),
          TrainConfig(dataset="digits", out=str(out), epochs=1, max_steps=10, batch_size=32, init_images=64,
                      device="cpu", num_workers=0, sample_temperatures=(0.0, 1.0)), progress=False)
    return str(out)
