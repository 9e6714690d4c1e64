// Debian's Chromium (`apt-get install -y chromium`); playwright's own browser builds cannot be
// downloaded here. Without the background-networking flags, Chromium's connections to the
// outside are refused by this machine's closed network, many at a time.
export const CHROMIUM = '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
