"""`nubes doctor`: checks that this host can run nubes (tools, KVM, kernel, cgroups, disk,
privileges, store) and says, for each problem, the exact command or setting that fixes it.
"""

from nubes.doctor.report import Check, Status, summary
from nubes.doctor.run import run_checks

__all__ = ["Check", "Status", "run_checks", "summary"]
