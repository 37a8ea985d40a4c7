"""fleetfetch producer: reads a URL list, enqueues one task per URL, follows the job."""
