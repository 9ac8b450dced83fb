"""experiments.report on a synthetic 2x2x2 sweep (known metrics): tables, CSV values, seed statistics and plots."""

import csv
import json

import numpy as np

from experiments import report as report_lib
from experiments import sweep as sw
from sd_jax import metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _make_sweep(tmp_path):
  sweep = sw.Sweep(
      config="configs/shapes_ddpm.py", arg="runlocal", fixed={"total_steps": 4},
      runs=sw.product(sw.grid("diffusion.prediction_type", ["epsilon", "v_prediction"]),
                      sw.grid("diffusion.min_snr_gamma", [0.0, 5.0]), sw.seeds(2)),
      name="{prediction_type}_snr{min_snr_gamma}_s{seed}",
      evals=[sw.Eval("accuracy", "true {out}"),
             sw.Eval("guidance", "true {guidance_scale} {out}", grid=sw.grid("guidance_scale", [1.0, 3.0, 5.0]),
                     select=sw.Best("shapes_accuracy", "max", eval="accuracy"))])
  out = str(tmp_path / "runs")
  runs = sw.expand(sweep, out)
  sw.write_manifest(out, sw.manifest(sweep, "experiments/synthetic.py", runs, "local"))
  expected = {}
  for i, run in enumerate(runs):
    # loss falls 1.0 -> 0.4 + 0.01 i, with a spike; eval_loss at steps 2 and 4; the last run is unfinished.
    losses = [1.0, 0.5 + 0.01 * i, 0.7, 0.4 + 0.01 * i]
    finished = i < len(runs) - 1
    steps = 4 if finished else 2
    writer = metrics.MetricWriter(run.workdir)
    for step in range(1, steps + 1):
      writer.write(step, {"loss": losses[step - 1], "learning_rate": 1e-3, "steps_per_sec": 5.0})
      if step % 2 == 0:
        writer.write(step, {"eval_loss": 0.9 - 0.1 * step + 0.02 * i})
    writer.close()
    (tmp_path / "runs" / run.name / "checkpoints" / str(steps)).mkdir(parents=True)
    accuracy = 0.5 + 0.05 * i
    sw.write_text(sw.eval_output(run.workdir, "accuracy", {}), json.dumps({"shapes_accuracy": accuracy}))
    expected[run.name] = dict(loss=losses[steps - 1], loss_best=min(losses[:steps]), eval_loss=0.9 - 0.1 * steps +
                              0.02 * i, eval_loss_best=0.9 - 0.1 * steps + 0.02 * i, accuracy=accuracy, steps=steps)
  # Guidance results for the best group (v_prediction, min-SNR 5: the highest accuracies).
  best = [r for r in runs if r.settings["diffusion.prediction_type"] == "v_prediction"
          and r.settings["diffusion.min_snr_gamma"] == 5.0]
  for r in best:
    for g in (1.0, 3.0, 5.0):
      sw.write_text(sw.eval_output(r.workdir, "guidance", {"guidance_scale": g}),
                    json.dumps({"shapes_accuracy": 0.1 * g + 0.01 * r.settings["seed"], "guidance_scale": g}))
  return out, runs, expected, best


def test_report_tables_and_plots(tmp_path):
  out, runs, expected, best = _make_sweep(tmp_path)
  assert report_lib.main([out]) == 0
  report_dir = tmp_path / "runs" / "report"

  rows = _rows(report_dir / "runs.csv")
  assert [r["run"] for r in rows] == [r.name for r in runs] and len(rows) == 8
  assert list(rows[0])[:7] == ["run", "prediction_type", "min_snr_gamma", "seed", "status", "step", "loss"]
  assert "learning_rate" not in rows[0] and "steps_per_sec" not in rows[0]
  for row in rows:
    e = expected[row["run"]]
    assert row["status"] == ("done" if e["steps"] == 4 else "partial") and int(row["step"]) == e["steps"]
    for key in ("loss", "loss_best", "eval_loss", "eval_loss_best"):
      np.testing.assert_allclose(float(row[key]), e[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(float(row["accuracy.shapes_accuracy"]), e["accuracy"], rtol=1e-12)

  # Over seeds: finished runs only (the last run stopped at step 2).
  groups = _rows(report_dir / "groups.csv")
  assert [g["n"] for g in groups] == ["2", "2", "2", "1"]
  for g in groups:
    names = [r.name for r in runs[:-1] if r.settings["diffusion.prediction_type"] == g["prediction_type"]
             and r.settings["diffusion.min_snr_gamma"] == float(g["min_snr_gamma"])]
    for key, column in (("loss", "loss"), ("accuracy", "accuracy.shapes_accuracy")):
      values = [expected[n][key] for n in names]
      np.testing.assert_allclose(float(g[f"{column}_mean"]), np.mean(values), rtol=1e-12)
      np.testing.assert_allclose(float(g[f"{column}_std"]), np.std(values), rtol=1e-9, atol=1e-15)

  guidance = _rows(report_dir / "eval_guidance.csv")
  assert [(r["run"], float(r["guidance_scale"])) for r in guidance] == [
      (r.name, g) for r in best for g in (1.0, 3.0, 5.0)]
  np.testing.assert_allclose([float(r["shapes_accuracy"]) for r in guidance],
                             [0.1 * g + 0.01 * r.settings["seed"] for r in best for g in (1.0, 3.0, 5.0)])

  text = (report_dir / "report.md").read_text()
  assert "| run | prediction_type | min_snr_gamma | seed | status | step | loss | loss_best |" in text
  assert "## Over seeds" in text and "## Evaluation guidance" in text
  assert "python -m experiments.sweep experiments/synthetic.py --out" in text
  pngs = ["loss_curves.png", "loss_vs_prediction_type.png", "loss_vs_min_snr_gamma.png",
          "eval_loss_vs_prediction_type.png", "accuracy.shapes_accuracy_vs_min_snr_gamma.png",
          "eval_guidance_shapes_accuracy_vs_guidance_scale.png"]
  for name in pngs:
    assert (report_dir / name).read_bytes()[:8] == PNG, name
    assert f"![{name}]({name})" in text


def test_best_selection_by_an_earlier_evaluation(tmp_path):
  _, runs, _, best = _make_sweep(tmp_path)
  sweep = sw.Sweep(config="configs/shapes_ddpm.py", runs=[r.settings for r in runs],
                   evals=[sw.Eval("accuracy", "true {out}"),
                          sw.Eval("guidance", "echo {guidance_scale} {out}", grid=sw.grid("guidance_scale", [1, 9]),
                                  select=sw.Best("shapes_accuracy", "max", eval="accuracy"))])
  # The last run is unfinished: no choice yet.
  assert isinstance(sw.eval_jobs(sweep, sweep.evals[1], runs, "python"), str)
  (tmp_path / "runs" / runs[-1].name / "checkpoints" / "4").mkdir()
  jobs = sw.eval_jobs(sweep, sweep.evals[1], runs, "python")
  assert [(j.run, j.settings["guidance_scale"]) for j in jobs] == [(r.name, g) for r in best for g in (1, 9)]
  assert jobs[1].command == f"echo 9 {best[0].workdir}/eval/guidance_guidance_scale=9.json"


def test_report_of_a_missing_directory_fails_clearly(tmp_path, capsys):
  assert report_lib.main([str(tmp_path / "nothing")]) == 2
  assert "is not a sweep output directory" in capsys.readouterr().err
