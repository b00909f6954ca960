"""README tables after view_source_scale 2 (this session): imports the table code of mk_tables.py."""
import sys
import numpy as np
sys.path.insert(0, "/work/results")
from mk_tables import J, table

def mean_auc(res, meth, classes=None):
    cs = classes or list(res["classes"])
    return float(np.mean([res["classes"][c][meth]["roc_auc"] for c in cs]))

mo, mr, to, tr = J("M_src2_all.json"), J("M_ref.json"), J("T_src2.json"), J("T_ref.json")
m1, t1 = J("M_ours_all.json"), J("T_ours2.json")
t, _ = table("MNIST", mo, mr, [str(i) for i in range(10)], "digit")
print("MNIST:\n" + t + "\n")
t, _ = table("tiles", to, tr, ["MT_Free"], "normal class")
print("TILES:\n" + t + "\n")

print("| data | knn, center_crop | knn, squash | msc `fast`, center_crop | msc `fast`, squash |")
print("|---|---|---|---|---|")
msq, tsq = J("Y_M_squash_fast.json"), J("Y_T_squash_fast.json")
print(f"| MNIST, 10 digits (seeds 0, 1, 2) | {mean_auc(m1,'knn'):.4f} | {mean_auc(J('M_squash.json'),'knn'):.4f} | "
      f"{mean_auc(mo,'msc-fast'):.4f} | {mean_auc(msq,'msc-fast'):.4f} |")
print(f"| magnetic tiles (seeds 0, 1, 2) | {mean_auc(t1,'knn'):.4f} | {mean_auc(J('T_squash2.json'),'knn'):.4f} | "
      f"{mean_auc(to,'msc-fast'):.4f} | {mean_auc(tsq,'msc-fast'):.4f} |")
print()
print("| data | `paper`, scale 1 | `paper`, scale 2 | reference loop, `paper` | `fast`, scale 1 | `fast`, scale 2 |")
print("|---|---|---|---|---|---|")
for label, a, b, r in (("MNIST, mean of 10 digits", m1, mo, mr), ("magnetic tiles", t1, to, tr)):
    print(f"| {label} | {mean_auc(a,'msc'):.4f} | {mean_auc(b,'msc'):.4f} | {mean_auc(r,'msc'):.4f} | "
          f"{mean_auc(a,'msc-fast'):.4f} | {mean_auc(b,'msc-fast'):.4f} |")
d = [mo["classes"][c]["msc"]["roc_auc"] - mr["classes"][c]["msc"]["roc_auc"] for c in map(str, range(10))]
print(f"\nMNIST ours - reference (paper) per digit: min {min(d):+.4f} max {max(d):+.4f}")
for name, res in (("MNIST", mo), ("tiles", to)):
    k, p, f = mean_auc(res, "knn"), mean_auc(res, "msc"), mean_auc(res, "msc-fast")
    print(f"{name}: error removed paper {100*(p-k)/(1-k):.1f} %, fast {100*(f-k)/(1-k):.1f} %")
