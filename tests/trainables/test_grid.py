"""The grid runner's checks before any run starts."""


def test_grid_refuses_an_override_no_preset_uses(tmp_path, capsys):
    """`--set method.drw.beta=...` on a DASO-only grid would be dropped from every run: refused before any run."""
    from trainables.grid import main as grid_main

    config = tmp_path / "base.yaml"
    config.write_text("method: {preset: fixmatch_daso, daso: {warmup: 5}}\n")
    code = grid_main(["--config", str(config), "--presets", "fixmatch_daso", "--out", str(tmp_path / "out"),
                      "--set", "method.drw.beta=0.9"])  # fmt: skip
    assert code == 2
    assert "no preset of this grid uses method.drw; presets that do: fixmatch_drw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
