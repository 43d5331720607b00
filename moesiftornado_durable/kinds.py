"""The kinds of record the pipeline carries, named once for every module from capture to the sender.

A leaf module with no imports: the middleware names a record's kind when it journals it, the journal encodes it,
the spool files it, the sender picks the Moesif endpoint by it, and none of them has to import another's code
(or reach back up the chain) to agree on the names.
"""

EVENT = "event"
USER = "user"
COMPANY = "company"
SUBSCRIPTION = "subscription"
KINDS = (EVENT, USER, COMPANY, SUBSCRIPTION)  # what the spool stores and the sender sends
# A request's raw parts (rawrecord.py), journaled by log_event; the shipper builds the event before spooling it.
CAPTURE = "capture"
