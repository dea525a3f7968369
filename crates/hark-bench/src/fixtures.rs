//! Realistic visitor data for presence runs: page URLs, titles, referrers and browser user
//! agents of the lengths real shops have, varied by visitor index and deterministic.

use hark_protocol::PageView;

const CATEGORIES: &[(&str, &str)] = &[
    ("shoes/running", "Running shoes"),
    ("shoes/trail", "Trail shoes"),
    ("clothing/jackets", "Jackets"),
    ("clothing/knitwear", "Knitwear"),
    ("bags/backpacks", "Backpacks"),
    ("accessories/watches", "Watches"),
    ("outdoor/tents", "Tents"),
    ("kids/winter", "Kids' winter"),
];

const PRODUCTS: &[&str] = &[
    "Aurora Trail Runner GTX",
    "Nimbus Daily Trainer",
    "Harbour Waxed Field Jacket",
    "Merino Crew Neck Sweater",
    "Summit 28 L Daypack",
    "Chrono Steel Automatic 40 mm",
    "Ridge 2-Person Ultralight Tent",
    "Puddle Jumper Insulated Boot",
    "Coastline Rain Shell",
    "Everyday Leather Tote",
];

const REFERRERS: &[Option<&str>] = &[
    Some("https://www.google.com/"),
    Some("https://www.bing.com/search?q=waterproof+trail+running+shoes&form=QBLH"),
    None,
    Some("https://t.co/x7Kq2LmZpA"),
    Some("https://www.facebook.com/"),
    None,
    Some("https://duckduckgo.com/"),
    Some("https://news.example.org/2026/11/best-winter-gear-guide"),
];

const CAMPAIGNS: &[&str] = &[
    "?utm_source=google&utm_medium=cpc&utm_campaign=autumn_sale_2026",
    "",
    "?utm_source=newsletter&utm_medium=email&utm_campaign=week47",
    "?variant=43817209&size=42",
    "",
];

pub const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.51",
];

/// A product page of a shop, as a tab would report it.
pub fn page(i: u64) -> PageView {
    let (cat, cat_title) = CATEGORIES[(i % CATEGORIES.len() as u64) as usize];
    let product = PRODUCTS[((i / 3) % PRODUCTS.len() as u64) as usize];
    let slug: String = product
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let sku = 10_000 + (i * 7_919) % 90_000;
    let campaign = CAMPAIGNS[((i / 5) % CAMPAIGNS.len() as u64) as usize];
    PageView {
        url: format!("https://shop.example.com/{cat}/{slug}-{sku}{campaign}"),
        title: Some(format!("{product} | {cat_title} | Example Outdoor Shop")),
        referrer: REFERRERS[((i / 2) % REFERRERS.len() as u64) as usize].map(str::to_owned),
    }
}

pub fn user_agent(i: u64) -> &'static str {
    USER_AGENTS[(i % USER_AGENTS.len() as u64) as usize]
}
