"""Diagnostic: patch the working tree so that the adaptive policy and the speculation loop append
one line per decision and per timed round to the file named by POLICY_TRACE. Applied for the
GPU runs 13-15 (docs/policy-traces/), then reverted with `git checkout scheduler/`; nothing in
the product reads these lines. Usage: python3 scripts/trace_policy_patch.py [repo root]

Lines (times in ms; "policy" is an instance id):
  P policy sessions k base_tokens verify(base) verify(base + 4 per session) draft(4)   a draft plan
  D policy drafting_sessions steps seconds sessions                                     a timed draft call
  V policy sessions batch_tokens round_ms profile_ms verified_drafts(0/1)               a timed verify round
  L policy sessions available chosen drafted_ms                                         a verification plan
  R policy sessions k draft_lengths draft_call verify_lengths verify_call+commit observe  a whole round
"""
import sys
root = (sys.argv[1] if len(sys.argv) > 1 else ".").rstrip("/") + "/"
def patch(path, pairs):
    s = open(root + path).read()
    for old, new in pairs:
        assert old in s, old
        s = s.replace(old, new, 1)
    open(root + path, "w").write(s)
T = 'import os as _os\n{ind}if _os.environ.get("POLICY_TRACE"):\n{ind}    with open(_os.environ["POLICY_TRACE"], "a") as fh:\n{ind}        fh.write({msg})\n'
def t(ind, msg): return T.format(ind=ind, msg=msg)
patch("scheduler/budget_policy.py", [
 ("        self._back_off_exploration(k > 0)\n", "        " + t("        ", 'f"P {id(self)%10000} {len(sessions)} {k} {base_tokens} {verify_seconds(base_tokens)*1e3:.2f} {verify_seconds(base_tokens+len(sessions)*4)*1e3:.2f} {draft_seconds(4)*1e3:.2f}\\n"') + "        self._back_off_exploration(k > 0)\n"),
 ("            self.draft_cost.add(mark[2], mark[1], drafted_seconds, entered)\n", "            self.draft_cost.add(mark[2], mark[1], drafted_seconds, entered)\n            " + t("            ", 'f"D {id(self)%10000} {mark[2]} {mark[1]} {drafted_seconds*1e3:.2f} {len(sessions)}\\n"')),
 ("                overhead.add(sessions, batch_tokens, max(seconds - profile.forward_seconds(batch_tokens), 0.0), now)\n", "                overhead.add(sessions, batch_tokens, max(seconds - profile.forward_seconds(batch_tokens), 0.0), now)\n                " + t("                ", 'f"V {id(self)%10000} {sessions} {batch_tokens} {seconds*1e3:.2f} {profile.forward_seconds(batch_tokens)*1e3:.2f} {int(mark[2])}\\n"')),
 ("        if self.config.measure_timing and base_tokens == len(sessions):\n", "        " + t("        ", 'f"L {id(self)%10000} {len(sessions)} {sum(available)} {sum(lengths.values())} {drafted_seconds*1e3:.1f}\\n"') + "        if self.config.measure_timing and base_tokens == len(sessions):\n"),
])
patch("scheduler/speculation_loop.py", [
 ("            lengths = self.policy.draft_lengths(sessions, self.context_limit)\n", "            _t0 = time.perf_counter()\n            lengths = self.policy.draft_lengths(sessions, self.context_limit)\n            _t1 = time.perf_counter()\n"),
 ("            verify_lengths = self.policy.verify_lengths(sessions, chunks, lengths)\n", "            _t2 = time.perf_counter()\n            verify_lengths = self.policy.verify_lengths(sessions, chunks, lengths)\n            _t3 = time.perf_counter()\n"),
 ("        await self.policy.observe(outcomes)\n", "        _t4 = time.perf_counter()\n        await self.policy.observe(outcomes)\n        _t5 = time.perf_counter()\n        " + t("        ", 'f"R {id(self.policy)%10000} {len(sessions)} {max(lengths.values())} {(_t1-_t0)*1e3:.3f} {(_t2-_t1)*1e3:.3f} {(_t3-_t2)*1e3:.3f} {(_t4-_t3)*1e3:.3f} {(_t5-_t4)*1e3:.3f}\\n"')),
])
