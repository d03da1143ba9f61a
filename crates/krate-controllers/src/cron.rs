//! Cron schedules (five fields, names, ranges, steps, lists, and the @hourly-style
//! macros) and their next firing time in a time zone.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed schedule: the allowed values of each field.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    /// Day-of-month and day-of-week both restricted: either may match (cron's rule).
    either_day: bool,
}

const MONTHS: &[&str] = &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(s: &str, names: &[&str], offset: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + offset);
    }
    s.parse().map_err(|_| format!("invalid value {s:?}"))
}

/// One field: `*`, `?`, `a`, `a-b`, `*/n`, `a-b/n`, `a/n`, comma lists.
fn field(spec: &str, min: u32, max: u32, names: &[&str], offset: u32) -> Result<(Vec<bool>, bool), String> {
    let mut allowed = vec![false; max as usize + 1];
    let mut star = false;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("invalid step in {part:?}"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("zero step in {part:?}"));
        }
        let (lo, hi) = match range {
            "*" | "?" => {
                star |= step == 1;
                (min, max)
            }
            r => match r.split_once('-') {
                Some((a, b)) => (value(a, names, offset)?, value(b, names, offset)?),
                None if part.contains('/') => (value(r, names, offset)?, max),
                None => {
                    let v = value(r, names, offset)?;
                    (v, v)
                }
            },
        };
        // Day of week 7 is Sunday too.
        let (lo, hi) = if max == 6 { (lo.min(7), hi.min(7)) } else { (lo, hi) };
        if lo < min || hi > max.max(if max == 6 { 7 } else { max }) || lo > hi {
            return Err(format!("{part:?} is out of range {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            allowed[(v % (max + 1)) as usize] = true;
            v += step;
        }
    }
    Ok((allowed, star))
}

impl Schedule {
    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let expanded = match spec.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [m, h, dom, mon, dow] = fields.as_slice() else {
            return Err(format!("expected exactly 5 fields, found {}: {spec:?}", fields.len()));
        };
        let (days, dom_star) = field(dom, 1, 31, &[], 0)?;
        let (weekdays, dow_star) = field(dow, 0, 6, DAYS, 0)?;
        Ok(Schedule {
            minutes: field(m, 0, 59, &[], 0)?.0,
            hours: field(h, 0, 23, &[], 0)?.0,
            days,
            months: field(mon, 1, 12, MONTHS, 1)?.0,
            weekdays,
            either_day: !dom_star && !dow_star,
        })
    }

    fn day_matches(&self, t: &DateTime) -> bool {
        let dom = self.days[t.day() as usize];
        let dow = self.weekdays[t.weekday().to_sunday_zero_offset() as usize];
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first firing strictly after `after`, in `tz`.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let mut t = after.to_zoned(tz.clone()).datetime().round(jiff::Unit::Minute).ok()?;
        if t <= after.to_zoned(tz.clone()).datetime() {
            t = t.checked_add(1.minute()).ok()?;
        }
        // Bounded: a schedule that never fires (Feb 30) gives up after five years.
        let limit = t.checked_add(5.years()).ok()?;
        while t < limit {
            if !self.months[t.month() as usize] {
                t = t.first_of_month().checked_add(1.month()).ok()?.with().hour(0).minute(0).build().ok()?;
                continue;
            }
            if !self.day_matches(&t) {
                t = t.date().checked_add(1.day()).ok()?.to_datetime(jiff::civil::time(0, 0, 0, 0));
                continue;
            }
            if !self.hours[t.hour() as usize] {
                t = t.with().minute(0).build().ok()?.checked_add(1.hour()).ok()?;
                continue;
            }
            if !self.minutes[t.minute() as usize] {
                t = t.checked_add(1.minute()).ok()?;
                continue;
            }
            return t.to_zoned(tz.clone()).ok().map(|z| z.timestamp());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(spec: &str, after: &str) -> String {
        Schedule::parse(spec).unwrap().next_after(after.parse().unwrap(), &TimeZone::UTC).unwrap().to_string()
    }

    #[test]
    fn schedules() {
        assert_eq!(next("* * * * *", "2026-11-23T10:00:30Z"), "2026-11-23T10:01:00Z");
        assert_eq!(next("*/15 * * * *", "2026-11-23T10:01:00Z"), "2026-11-23T10:15:00Z");
        assert_eq!(next("0 9 * * MON-FRI", "2026-11-28T10:00:00Z"), "2026-11-30T09:00:00Z");
        assert_eq!(next("@monthly", "2026-11-23T10:00:00Z"), "2026-12-01T00:00:00Z");
        assert_eq!(next("30 2 1 JAN *", "2026-11-23T10:00:00Z"), "2027-01-01T02:30:00Z");
        assert_eq!(next("0 0 13 * 5", "2026-11-23T10:00:00Z"), "2026-11-27T00:00:00Z", "day of month or Friday");
        assert!(Schedule::parse("* * *").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
        assert!(Schedule::parse("*/0 * * * *").is_err());
    }
}
