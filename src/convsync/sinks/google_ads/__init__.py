"""Google Ads sink, a module per way in: ``datamanager`` sends the uploads (offline click
conversions, enhanced conversions for leads) through the Data Manager API and reads back
what Google did with them; ``adjustments`` retracts conversions through the Google Ads API,
the one way to take a conversion back, for the accounts still allowed to use it."""
