"""Channel providers: each module keeps one provider's sending and its webhook parsing together.

Used by runner/ (sending) and api/ (webhooks); imports neither.
"""
