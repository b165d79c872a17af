"""Local simulators of Google Ads, GA4, Meta and Klaviyo speaking their real wire protocols."""
