import tempfile

import moescope

p = moescope.params("demo")  # config + safetensors headers only: a ParamsReport
print(p.total_params, p.active_params, f"{p.activation_ratio:.1%}")

out = tempfile.mkdtemp() + "/trace"
run = moescope.trace("demo", "demo", out, max_tokens=4000, seq_len=128)  # writes a trace directory
t = moescope.load_trace(out)  # expert_load, coactivation, domain_load, capacity: DataFrames

load = t.expert_load.assign(share=lambda d: d["count"] / d.groupby("layer")["count"].transform("sum"))
busiest = load.sort_values("share", ascending=False).groupby("layer").head(1)  # busiest expert per layer
print(busiest[["layer", "expert", "count", "share"]].sort_values("layer"))

rep = moescope.report(out)  # every table of `moescope report`, as DataFrames
print(rep.layers[["layer", "imbalance_max_mean", "entropy_norm", "dead"]])
print(rep.to_dict()["tokens"], "tokens traced")
