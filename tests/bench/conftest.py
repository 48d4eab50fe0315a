"""The benchmark scripts of experiments/bench/, each run as a user runs it in its tiny CPU mode
(`--tiny`, seconds each), so that none can break unseen. What they measure is left to them: these
tests check that a script ran, printed its table and wrote its rows."""
